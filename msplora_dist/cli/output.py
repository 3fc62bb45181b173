"""What the training command prints besides its own lines: the libraries' chatter kept to what a user needs.

Called once, before deepspeed is imported. Nothing here hides an error: DeepSpeed's logger keeps its warnings and
errors, exceptions propagate, and only two known messages are dropped, each replaced by a line of ours or by
nothing lost (see each).
"""

from __future__ import annotations

import logging
import warnings

# torch 2.13 deprecates the collective names DeepSpeed's ZeRO calls (all_gather_into_tensor, reduce_scatter_tensor)
# and warns from inside each call: without a launcher's fresh process per rank, once per step. Nothing for a
# user to act on.
TORCH_DIST_DEPRECATION = r"`torch\.distributed\.\w+` is deprecated"
# DeepSpeed's accelerator auto-detection on a machine without CUDA; printed by every process. The training
# command says instead, once, that it trains on the CPU (train_device_line).
DS_CPU_FALLBACK = "Setting accelerator to CPU"


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_libraries() -> None:
    """Filter the deprecation noise once and keep DeepSpeed's logger at warnings (its INFO lines describe its
    internals: configs, timers, buffer sizes). Idempotent."""
    warnings.filterwarnings("ignore", message=TORCH_DIST_DEPRECATION, category=FutureWarning)
    ds_logger = logging.getLogger("DeepSpeed")  # the logger deepspeed.utils.logging creates (it keeps its filters)
    ds_logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _DropMessages) for f in ds_logger.filters):
        ds_logger.addFilter(_DropMessages(DS_CPU_FALLBACK))


def train_device_line() -> str | None:
    """One line on where training runs when torch sees no GPU, and what the first start compiles (else None)."""
    import torch

    if torch.cuda.is_available():
        return None
    from msplora_dist.dist.process import shm_op_build_pending

    line = "device: CPU (torch sees no CUDA GPU); collectives on gloo"
    if shm_op_build_pending():
        line += ("\ncompiling DeepSpeed's CPU shared-memory collectives op (deepspeed_shm_comm), once per machine: the CPU "
                 "all-reduce and broadcast use it; about 1-2 minutes with no other output, then cached in torch's "
                 "extension directory")
    return line
