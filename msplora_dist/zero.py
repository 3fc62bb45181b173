"""Everything that must know about ZeRO-3 partitioned parameters lives here.

A ZeRO-3 parameter outside a forward pass holds only this rank's shard: its .shape is (0,) or a
slice. Read sizes through full_shape/full_numel, and touch values only inside gathered().
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


def is_zero3_param(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def full_shape(param: torch.Tensor) -> torch.Size:
    return param.ds_shape if is_zero3_param(param) else param.shape


def full_numel(param: torch.Tensor) -> int:
    return param.ds_numel if is_zero3_param(param) else param.numel()


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], *, modifier_rank: int | None = None) -> Iterator[None]:
    """Make the full values of `params` visible on every rank for the duration of the block.

    modifier_rank=None: read only. modifier_rank=k: what rank k writes is broadcast to the shards on exit.
    A no-op for ordinary tensors, so callers need not know whether ZeRO-3 is on.
    """
    zero_params = [p for p in params if is_zero3_param(p)]
    if not zero_params:
        yield
        return
    import deepspeed  # only reached when ZeRO-3 partitioned the parameters, so deepspeed is loaded

    with deepspeed.zero.GatheredParameters(zero_params, modifier_rank=modifier_rank):
        yield
