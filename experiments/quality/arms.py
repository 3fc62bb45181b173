"""The quality study's arms: which adapters are compared, and their parameter counts on a given base.

Every arm is an MSPLoRA configuration; plain LoRA is ranks (0, 0, r): one layer-specific pair per layer and
target, no shared level. That is exactly LoRA: tests/adapters/test_peft_equivalence.py checks outputs and every
gradient against PEFT's LoRA with the same weights, and the initialisation (A kaiming-uniform with a = sqrt(5),
B zero) and scale (alpha / r) are PEFT's. Using our layer for both methods keeps everything else identical
(the trainer, dtypes, kernels, dropout), so the comparison isolates the shared levels.

Arms (alpha 16 and dropout 0.05 at every level, 3 mid groups: the paper's settings):
    lora_qv_r64        LoRA r=64 on q_proj, v_proj                       (the paper's LoRA baseline)
    msp_qv_paper       MSPLoRA (64, 32, 16) on q_proj, v_proj            (the paper's MSPLoRA)
    msp_qv_eq_lora64   MSPLoRA at the paper's 4:2:1 rank shape, scaled to lora_qv_r64's parameters
    lora_qv_eq_paper   LoRA at msp_qv_paper's parameters
    lora_all_r16       LoRA r=16 on every linear projection
    msp_all_eq_lora16  MSPLoRA at 4:2:1, scaled to lora_all_r16's parameters
    msp_all_third      MSPLoRA at 4:2:1 with a third of lora_all_r16's parameters (the paper's 11.0 M / 33.6 M ratio)
Matched arms come from match_msplora_ranks / match_lora_rank (msplora_dist.count_params), within tol (3%).
On 30 layers (SmolLM2) the paper's (64, 32, 16) on q, v is itself a third of LoRA r=64's count (0.333x; on
LLaMA-2-7B's 32 layers 0.328x), so the q, v pair already asks the "a third of the parameters" question there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from msplora_dist import ALL_LINEAR_TARGETS, MSPLoRAConfig, count_params

QV = ("q_proj", "v_proj")
PAPER_RANKS = (64, 32, 16)
PAPER_SHAPE = (4, 2, 1)

# Reference shapes (config.json fields) for the parameter counts the docs quote.
LLAMA2_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008)
SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                    intermediate_size=1536)


@dataclass(frozen=True)
class Arm:
    name: str
    ranks: tuple[int, int, int]
    targets: tuple[str, ...]
    params: int
    note: str = ""
    matched_to: str | None = None

    @property
    def kind(self) -> str:
        return "LoRA" if self.ranks[0] == 0 and self.ranks[1] == 0 else "MSPLoRA"


def trainable_params(ranks, targets, features: dict, num_layers: int, groups: int) -> int:
    cfg = MSPLoRAConfig(ranks=tuple(ranks), target_modules=tuple(targets), num_mid_groups=groups)
    return count_params(cfg, num_layers, {t: features[t] for t in targets}).total


def match_lora_rank(target: int, targets, features: dict, num_layers: int, groups: int) -> tuple[int, int, int]:
    """LoRA (0, 0, r) with the parameter count closest to target."""
    per_rank = trainable_params((0, 0, 1), targets, features, num_layers, groups)
    return (0, 0, max(1, round(target / per_rank)))


def match_msplora_ranks(target: int, targets, features: dict, num_layers: int, groups: int, shape=PAPER_SHAPE,
                        tol: float = 0.03) -> tuple[int, int, int]:
    """Pyramid ranks (g >= m >= l >= 1) within tol of target parameters, the closest to the rank shape
    (paper 4:2:1) in log ratio; ties: the closer count, then the smaller total rank. Parameters are
    width * (g + G m + L l), so this searches the integer solutions of that sum."""
    width = trainable_params((1, 0, 0), targets, features, num_layers, groups)  # sum of in + out over targets
    want = target / width
    best = None
    for low in range(1, int(want / num_layers) + 2):
        for mid in range(low, int((want - num_layers * low) / groups) + 2):
            top = round(want - groups * mid - num_layers * low)
            if top < mid:
                continue
            n = width * (top + groups * mid + num_layers * low)
            err = abs(n - target) / target
            if err > tol:
                continue
            shape_err = ((math.log(top / mid) - math.log(shape[0] / shape[1])) ** 2
                         + (math.log(mid / low) - math.log(shape[1] / shape[2])) ** 2)
            key = (round(shape_err, 9), err, top + mid + low)
            if best is None or key < best[0]:
                best = (key, (top, mid, low))
    if best is None:
        raise ValueError(f"no pyramid ranks within {tol:.0%} of {target} parameters on {targets}")
    return best[1]


def define_arms(features: dict, num_layers: int, groups: int = 3, tol: float = 0.03) -> list[Arm]:
    def arm(name, ranks, targets, note, matched_to=None):
        return Arm(name, tuple(ranks), tuple(targets), trainable_params(ranks, targets, features, num_layers, groups), note, matched_to)

    def msp_at(n: int, targets):
        return match_msplora_ranks(n, targets, features, num_layers, groups, tol=tol)

    lora64 = arm("lora_qv_r64", (0, 0, 64), QV, "the paper's LoRA baseline (r=64 on q, v)")
    paper = arm("msp_qv_paper", PAPER_RANKS, QV, "the paper's MSPLoRA (64, 32, 16) on q, v")
    msp64 = arm("msp_qv_eq_lora64", msp_at(lora64.params, QV), QV, "MSPLoRA 4:2:1 at LoRA r=64's parameters", "lora_qv_r64")
    lora_p = arm("lora_qv_eq_paper", match_lora_rank(paper.params, QV, features, num_layers, groups), QV,
                 "LoRA at the paper MSPLoRA's parameters", "msp_qv_paper")
    lora16 = arm("lora_all_r16", (0, 0, 16), ALL_LINEAR_TARGETS, "LoRA r=16 on all linear projections")
    msp16 = arm("msp_all_eq_lora16", msp_at(lora16.params, ALL_LINEAR_TARGETS), ALL_LINEAR_TARGETS,
                "MSPLoRA 4:2:1 at LoRA all-linear r=16's parameters", "lora_all_r16")
    third = arm("msp_all_third", msp_at(round(lora16.params / 3), ALL_LINEAR_TARGETS), ALL_LINEAR_TARGETS,
                "MSPLoRA 4:2:1 at a third of LoRA all-linear r=16's parameters")
    return [lora64, paper, msp64, lora_p, lora16, msp16, third]


def arm_dict(a: Arm) -> dict:
    """An arm as grid.json and results.json record it."""
    return dict(name=a.name, ranks=list(a.ranks), targets=list(a.targets), params=a.params, note=a.note, matched_to=a.matched_to,
                kind=a.kind)
