"""The learning-rate schedule, defined once: linear warmup, then cosine decay to min_lr_ratio of the peak.
The trainer, the benchmark and the experiments all use it."""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak rate for optimizer step `step` (0-based). Warmup reaches 1 at step `warmup_steps`
    (step 0 already trains, at 1 / (warmup + 1) of the peak); the cosine then ends at min_lr_ratio."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def lr_lambda(total_steps: int, warmup_ratio: float, min_lr_ratio: float) -> Callable[[int], float]:
    """The multiplier as torch.optim.lr_scheduler.LambdaLR takes it, with warmup_ratio of the steps warming up."""
    warmup = int(warmup_ratio * total_steps)
    return lambda step: warmup_cosine(step, total_steps, warmup, min_lr_ratio)
