"""The two building blocks: LoRAPair owns one (A, B) pair; MSPLoRALinear adds the three levels' updates
to a frozen base projection.

A shared pair is owned by exactly one LoRAPair (registered under the model's MSPLoRAHierarchy);
every MSPLoRALinear that uses it holds a plain Python reference, not a registered submodule, so
parameters() and state_dict() list each tensor once and autograd sums its gradient over all users.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from msplora_dist.adapters.config import LEVELS


class LoRAPair(nn.Module):
    """lora_A (r, in_features) and lora_B (out_features, r), PEFT's convention."""

    def __init__(self, in_features: int, out_features: int, rank: int, *, init_lora_weights: bool = True,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, dtype=dtype, device=device))
        self.reset_parameters(init_lora_weights)

    @torch.no_grad()
    def reset_parameters(self, init_lora_weights: bool = True) -> None:
        # Same init as PEFT's LoRA: the update B A starts at zero, so the model starts at the base.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init_lora_weights:
            nn.init.zeros_(self.lora_B)
        else:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def base_features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a base projection, read from attributes, never from .weight.shape
    (a ZeRO-3 partitioned weight has shape (0,) and a 4-bit weight is packed)."""
    try:
        return int(base.in_features), int(base.out_features)
    except AttributeError:
        raise TypeError(f"{type(base).__name__} has no in_features/out_features; expected nn.Linear or bnb Linear4bit") from None


class MSPLoRALinear(nn.Module):
    """h = base(x) + sum over levels of s_level * B_level A_level dropout_level(x).

    `pairs` holds the (global, mid, layer) LoRAPairs of this projection, None for a level that is off.
    They are references to pairs owned elsewhere (see module docstring).
    """

    def __init__(self, base_layer: nn.Module, pairs: tuple[LoRAPair | None, LoRAPair | None, LoRAPair | None],
                 scales: tuple[float, float, float], dropout: tuple[float, float, float]):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_features(base_layer)
        levels = [i for i, p in enumerate(pairs) if p is not None]
        # object.__setattr__ keeps the pairs out of this module's registry (one owner per tensor).
        object.__setattr__(self, "_pairs", tuple(pairs[i] for i in levels))
        self.levels = tuple(levels)
        self.scales = tuple(float(scales[i]) for i in levels)
        self.dropout = tuple(float(dropout[i]) for i in levels)
        self.merged = False
        self.adapter_enabled = True
        self._original_weight: torch.Tensor | None = None

    @property
    def pairs(self) -> tuple[LoRAPair, ...]:
        """The active levels' pairs, in the order of self.levels."""
        return self._pairs

    def _pads(self, x: torch.Tensor, per_level: bool) -> tuple[int, ...]:
        """Zero rank columns to append after each level so that the GEMMs see rank dimensions that are multiples
        of RANK_ALIGN (CUDA only). per_level: each level's own GEMM (dropout path); else only the total."""
        if x.device.type not in PAD_DEVICE_TYPES:
            return (0,) * len(self._pairs)
        if per_level:
            return tuple(-p.rank % RANK_ALIGN for p in self._pairs)
        return (0,) * (len(self._pairs) - 1) + (-sum(p.rank for p in self._pairs) % RANK_ALIGN,)

    def _cat_A(self, dtype: torch.dtype, pads: tuple[int, ...] | None = None) -> torch.Tensor:
        """[A_G; A_M; A_L] (with `pads` zero rows after each level) in `dtype`: one concatenation, then one cast
        (a cast is elementwise, so this is bit for bit the concatenation of the cast pieces)."""
        pieces = []
        for pair, pad in zip(self._pairs, pads or (0,) * len(self._pairs), strict=True):
            pieces.append(pair.lora_A)
            if pad:
                pieces.append(_zeros(pad, self.in_features, pair.lora_A))
        return (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)).to(dtype)

    def _scaled_B(self, dtype: torch.dtype, pads: tuple[int, ...] | None = None) -> torch.Tensor:
        """[s_G B_G, s_M B_M, s_L B_L] (with `pads` zero columns after each level) in `dtype`.

        Scales are folded into B (out x r elements) rather than into the activations (tokens x r):
        cheaper for any batch of more than `out_features` tokens. Values are exactly those of casting each
        B to `dtype` and multiplying by its Python-float scale (the product is taken in float32 and
        rounded once to `dtype`), in at most 4 kernels instead of 2 per level + 1."""
        pairs, scales = self._pairs, self.scales
        pads = pads or (0,) * len(pairs)
        pieces = []
        for pair, pad in zip(pairs, pads, strict=True):
            pieces.append(pair.lora_B)
            if pad:
                pieces.append(_zeros(self.out_features, pad, pair.lora_B))
        B = (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)).to(dtype)
        if all(s == scales[0] for s in scales):
            return B * scales[0]
        return (B * self._scale_row(B.device, pads, torch.promote_types(dtype, torch.float32))).to(dtype)

    def _scale_row(self, device: torch.device, pads: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """(1, r) row of each rank column's scale (0 for padding) in `dtype` (float32, or float64 for
        delta_weight in float64), cached per device, ranks, pads and dtype. Under torch.compile it is a constant of
        the graph instead: a cache written inside a compiled region would be guarded on, and recompile."""
        if torch.compiler.is_compiling():
            return self._new_scale_row(device, pads, dtype)
        cache = self.__dict__.setdefault("_scale_rows", {})
        key = (device, tuple(p.rank for p in self._pairs), pads, dtype)
        row = cache.get(key)
        if row is None:
            row = cache[key] = self._new_scale_row(device, pads, dtype)
        return row

    def _new_scale_row(self, device: torch.device, pads: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        values = [v for p, s, pad in zip(self._pairs, self.scales, pads, strict=True) for v in [s] * p.rank + [0.0] * pad]
        return torch.tensor(values, dtype=dtype, device=device).unsqueeze(0)

    def _hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """(..., r) = [A_G d_G(x), A_M d_M(x), A_L d_L(x)] (one GEMM when no dropout applies), and the zero
        columns it carries after each level."""
        if not self.training or not any(self.dropout):
            pads = self._pads(x, per_level=False)
            return F.linear(x, self._cat_A(x.dtype, pads)), pads
        # Each level draws its own dropout mask, as three separate LoRA modules would.
        pads = self._pads(x, per_level=True)
        hidden = [F.linear(F.dropout(x, p=d, training=True) if d else x,
                           (torch.cat([pair.lora_A, _zeros(pad, self.in_features, pair.lora_A)]) if pad else pair.lora_A).to(x.dtype))
                  for pair, d, pad in zip(self._pairs, self.dropout, pads, strict=True)]
        return torch.cat(hidden, dim=-1), pads

    def adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        """sum_l s_l B_l A_l d_l(x), computed in x's dtype as one concatenated-rank GEMM pair when
        no dropout applies (eval, or p = 0 at every level)."""
        hidden, pads = self._hidden(x)
        return F.linear(hidden, self._scaled_B(x.dtype, pads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged or not self.adapter_enabled or not self._pairs:
            return out
        if out.dtype != x.dtype or out.device.type == "meta":
            return out + self.adapter_output(x).to(out.dtype)
        # out + hidden B^T as one GEMM whose epilogue adds `out` (addmm, beta = 1): saves writing the
        # (tokens x out) update and reading it back for a separate add, in the forward and in every
        # recomputation under gradient checkpointing. The sum is rounded once instead of twice.
        hidden, pads = self._hidden(x)
        B = self._scaled_B(x.dtype, pads)
        return torch.addmm(out.reshape(-1, out.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), B.t()).view(out.shape)

    @torch.no_grad()
    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The update sum_l s_l B_l A_l as an (out_features, in_features) matrix."""
        return self._scaled_B(dtype) @ self._cat_A(dtype)

    @torch.no_grad()
    def merge(self, keep_original: bool = True) -> None:
        """Fold the update into the base weight (fp32/bf16/fp16 nn.Linear). keep_original stores the
        weight as it was (on CPU) so unmerge() restores it bit for bit; without it, unmerge subtracts."""
        if self.merged:
            return
        weight = _dense_weight(self.base_layer)
        self._original_weight = weight.detach().to("cpu", copy=True) if keep_original else None
        weight.copy_((weight.float() + self.delta_weight(torch.float32).to(weight.device)).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = _dense_weight(self.base_layer)
        if self._original_weight is not None:
            weight.copy_(self._original_weight.to(weight.device))
        else:
            weight.copy_((weight.float() - self.delta_weight(torch.float32).to(weight.device)).to(weight.dtype))
        self._original_weight = None
        self.merged = False

    def extra_repr(self) -> str:
        parts = ", ".join(f"{LEVELS[lv]}: r={p.rank} s={s:g} p={d:g}"
                          for lv, p, s, d in zip(self.levels, self._pairs, self.scales, self.dropout, strict=True))
        return f"in_features={self.in_features}, out_features={self.out_features}, {parts}"


RANK_ALIGN = 8
"""On CUDA the concatenated rank is padded with zero columns to a multiple of this: a bf16 GEMM whose rank
dimension is not a multiple of 8 elements (16 bytes) leaves cuBLAS's fast tensor-core kernels (measured in
docs/benchmarks.md). The zeros add exact zeros: outputs and gradients are those without padding up to the
order of float summation inside the GEMM."""
PAD_DEVICE_TYPES = {"cuda"}
"""Device types on which the rank is padded (tests add "cpu" to check that padding changes nothing)."""

_ZEROS: dict[tuple, torch.Tensor] = {}


def _zeros(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """A cached, never-written (rows, cols) zero block with like's dtype and device (padding for torch.cat); under
    torch.compile a constant of the graph (see MSPLoRALinear._scale_row)."""
    if torch.compiler.is_compiling():
        return torch.zeros(rows, cols, dtype=like.dtype, device=like.device)
    key = (rows, cols, like.dtype, like.device)
    block = _ZEROS.get(key)
    if block is None:
        block = _ZEROS[key] = torch.zeros(rows, cols, dtype=like.dtype, device=like.device)
    return block


def _dense_weight(base: nn.Module) -> torch.Tensor:
    weight = getattr(base, "weight", None)
    if weight is None or not weight.is_floating_point() or type(base).__name__ in ("Linear4bit", "Linear8bitLt"):
        raise TypeError(
            f"cannot merge into a {type(base).__name__} base layer: in-place merge needs a floating-point "
            "nn.Linear; export a merged model instead (the 4-bit base is dequantized there)"
        )
    return weight
