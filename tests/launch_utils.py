"""Running the real entry points in subprocesses, as a user would."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "launch" / "train.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict:
    env = dict(os.environ)
    # One thread per rank: two ranks on two cores, no oversubscription.
    # The checkout first; anything else on PYTHONPATH (packages installed with pip --target) after it.
    path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=path, TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def run_train(output_dir: Path, *args: str, nproc: int = 1, timeout: int = 600, check: bool = True,
              master_port: int | None = None) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus nproc launch/train.py ...` on CPU (gloo)."""
    port = master_port or free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", str(port),
           str(TRAIN), "--output_dir", str(output_dir), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n"
                             f"--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def summary(output_dir: Path) -> dict:
    return json.loads((output_dir / "summary.json").read_text())


def adapter_tensors(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "adapter" / "adapter_model.safetensors")


def relative_differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[float]:
    """||a - b|| / ||b|| for each tensor."""
    assert a.keys() == b.keys()
    return [((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp_min(1e-30)).item() for k in a]


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(relative_differences(a, b))
