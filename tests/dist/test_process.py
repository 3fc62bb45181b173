"""Starting the process group: a master port another process holds is one line naming it, not a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys

from tests.launch_utils import REPO, subprocess_env

CODE = """
import os
from msplora_dist.dist.process import init_distributed
from msplora_dist.errors import ConfigError
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["BUSY"])
try:
    init_distributed(on_gpu=False)
except ConfigError as err:
    print("refused:", err)
"""


def test_a_busy_master_port_is_one_clear_line():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, "-c", CODE], cwd=REPO, env=subprocess_env() | {"BUSY": str(port)},
                              capture_output=True, text=True, timeout=120)
    assert f"refused: MASTER_PORT {port} on 127.0.0.1 is already in use" in proc.stdout, proc.stdout + proc.stderr[-2000:]
