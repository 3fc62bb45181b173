"""Start and end the process group the way every entry point needs it, on GPUs (NCCL) and on CPU (gloo).

Started under `deepspeed` (or torchrun) the launcher's RANK/WORLD_SIZE/MASTER_* are used; a plain
`python script.py` becomes a world of one on a free local port.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from msplora_dist.errors import ConfigError

SHM_DIR = Path("/dev/shm")


def init_distributed(on_gpu: bool) -> tuple[int, int]:
    """Initialise DeepSpeed's process group (idempotent); returns (rank, world size)."""
    import deepspeed

    if not dist.is_initialized():
        if "RANK" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        try:
            deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
        except RuntimeError as err:  # torch's DistNetworkError among them, with a C++ traceback in its message
            if "address already in use" not in str(err).lower():
                raise
            raise ConfigError(f"MASTER_PORT {os.environ['MASTER_PORT']} on {os.environ.get('MASTER_ADDR')} is already in use "
                              "(another run?); expected a free port: pass --master_port to deepspeed") from None
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def cpu_allreduce_buffer(rank: int) -> Path:
    """The shared-memory segment DeepSpeed's CPU all-reduce op creates for `rank` of this run.

    deepspeed/ops/csrc/cpu/comm/shm.cpp names it after the user id, MASTER_ADDR, MASTER_PORT and the
    rank, maps it, and never unlinks it: every CPU run on a new port would leave ~69 MB of memory per
    rank in /dev/shm until the machine restarts.
    """
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def shutdown_distributed() -> None:
    """Destroy the process group and remove the run's CPU all-reduce segments (a no-op where none exists).

    Every rank removes every rank's segment, so one that died without cleaning up leaves nothing behind
    either. Removing is safe once the group is gone: processes that mapped a segment keep their mappings,
    and nobody opens it again.
    """
    if not dist.is_initialized():
        return
    world = dist.get_world_size()
    try:
        dist.destroy_process_group()
    finally:  # also when a dead peer makes the teardown fail
        for rank in range(world):
            cpu_allreduce_buffer(rank).unlink(missing_ok=True)


def shm_op_build_pending() -> bool:
    """Whether DeepSpeed will compile its CPU shared-memory collectives op (deepspeed_shm_comm) when this process
    starts its process group: on a CPU, the first start on a machine, until torch's extension cache holds it
    (a minute or more with no output)."""
    if torch.cuda.is_available():
        return False
    import sys

    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import get_default_build_root

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False) or installed_ops.get(builder.name):
        return False
    # torch.utils.cpp_extension's JIT cache layout: {root}/py{XY}{abiflags}_cpu/{name}/{name}.so
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    tag = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_cpu"
    return not (root / tag / builder.name / f"{builder.name}.so").is_file()
