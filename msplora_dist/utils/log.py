"""One logging call for every entry point: rank 0 prints, above the progress bar rather than through it."""

from __future__ import annotations

import os
import sys


def log(msg: str) -> None:
    """Print on rank 0 only (RANK is set by the launcher before torch.distributed starts)."""
    if int(os.environ.get("RANK", "0")) == 0:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stdout)
        sys.stdout.flush()
