"""MSPLoRAConfig: what the adapter hierarchy looks like, validated once, in one place.

The three levels are always listed in the order (global, mid, layer); see docs/method.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from msplora_dist.errors import ConfigError

LEVELS = ("global", "mid", "layer")

ALL_LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _rank(value) -> int:
    """int() that refuses what it would silently change: 4.5 -> 4, True -> 1."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{value!r} is not an integer")
    return int(value)


def _triple(name: str, value, cast) -> tuple:
    """Accept a scalar (same for every level) or a 3-sequence (global, mid, layer)."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        value = (value, value, value)
    if len(value) != 3:
        raise ConfigError(f"{name}={list(value)!r}: expected 3 values (global, mid, layer) or one for all levels")
    try:
        return tuple(cast(v) for v in value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{name}={list(value)!r}: expected numbers ({err})") from None


@dataclass
class MSPLoRAConfig:
    """The multi-scale adapter hierarchy: one global pair per target type, one pair per mid group and
    type, one pair per layer and type."""

    ranks: tuple[int, int, int] = (64, 32, 16)
    """Ranks of the (global, mid, layer) levels; 0 switches a level off."""
    alphas: tuple[float, float, float] = (16.0, 16.0, 16.0)
    """LoRA alpha per level; the scale is alpha / r (alpha / sqrt(r) with use_rslora)."""
    num_mid_groups: int = 3
    """G: the decoder layers are split into G contiguous groups whose sizes differ by at most one."""
    target_modules: tuple[str, ...] = ALL_LINEAR_TARGETS
    """Names of the linear projections to adapt inside each decoder layer (q_proj, ..., down_proj)."""
    dropout: tuple[float, float, float] = (0.05, 0.05, 0.05)
    """Dropout on each level's input; a single float sets all three."""
    use_rslora: bool = False
    """Scale by alpha / sqrt(r) (rank-stabilised LoRA) instead of alpha / r."""
    init_lora_weights: bool = True
    """A kaiming-uniform, B zero (the model starts exactly at the base). False: B random too (tests)."""
    groups: tuple[tuple[int, int], ...] | None = field(default=None, repr=False)
    """Explicit [start, end) layer range of each mid group; filled from num_mid_groups when the model
    is known (a saved adapter carries them, so loading never re-derives a different split)."""

    def __post_init__(self):
        self.ranks = _triple("ranks", self.ranks, _rank)
        self.alphas = _triple("alphas", self.alphas, float)
        self.dropout = _triple("dropout", self.dropout, float)
        for level, r in zip(LEVELS, self.ranks, strict=True):
            if r < 0:
                raise ConfigError(f"ranks={list(self.ranks)}: the {level} rank is {r}; expected >= 0 (0 switches it off)")
        if sum(self.ranks) == 0:
            raise ConfigError(f"ranks={list(self.ranks)}: every level is switched off; expected at least one rank > 0")
        for level, a, r in zip(LEVELS, self.alphas, self.ranks, strict=True):
            if r > 0 and not (math.isfinite(a) and a > 0):
                raise ConfigError(f"alphas={list(self.alphas)}: the {level} alpha is {a}; expected a finite number > 0")
        for level, p in zip(LEVELS, self.dropout, strict=True):
            if not 0.0 <= p < 1.0:
                raise ConfigError(f"dropout={list(self.dropout)}: the {level} dropout is {p}; expected 0 <= p < 1")
        if isinstance(self.target_modules, str):
            self.target_modules = tuple(t.strip() for t in self.target_modules.split(",") if t.strip())
        if not isinstance(self.target_modules, Iterable) or not all(isinstance(t, str) for t in self.target_modules):
            raise ConfigError(f"target_modules={self.target_modules!r}: expected module names such as q_proj, v_proj")
        self.target_modules = tuple(self.target_modules)
        if not self.target_modules:
            raise ConfigError("target_modules is empty; expected names such as q_proj, v_proj")
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ConfigError(f"target_modules={list(self.target_modules)}: a name is repeated")
        if not isinstance(self.num_mid_groups, int) or isinstance(self.num_mid_groups, bool) or self.num_mid_groups < 1:
            raise ConfigError(f"num_mid_groups={self.num_mid_groups!r}: expected an integer >= 1")
        if self.groups is not None:
            try:
                self.groups = tuple((int(s), int(e)) for s, e in self.groups)
            except (TypeError, ValueError):
                raise ConfigError(f"groups={self.groups!r}: expected a list of [start, end) layer ranges, one per mid group") from None
            if len(self.groups) != self.num_mid_groups:
                raise ConfigError(
                    f"groups={[list(g) for g in self.groups]} has {len(self.groups)} ranges but "
                    f"num_mid_groups={self.num_mid_groups}; expected one range per group"
                )
            validate_groups(self.groups, self.groups[-1][1] if self.groups else 0)

    @classmethod
    def paper(cls, **overrides) -> MSPLoRAConfig:
        """The paper's LLaMA-2-7B setting: q_proj/v_proj, ranks (64, 32, 16), alpha 16, 3 groups."""
        values = dict(ranks=(64, 32, 16), alphas=(16, 16, 16), num_mid_groups=3,
                      target_modules=("q_proj", "v_proj"), dropout=0.05)
        values.update(overrides)
        return cls(**values)

    def scale(self, level: int) -> float:
        """The factor s applied to level `level`'s B A (0 for a level that is off)."""
        r = self.ranks[level]
        if r == 0:
            return 0.0
        return self.alphas[level] / (math.sqrt(r) if self.use_rslora else r)

    @property
    def total_rank(self) -> int:
        return sum(self.ranks)

    def with_groups(self, num_layers: int) -> MSPLoRAConfig:
        """This config with the explicit group ranges for a model of `num_layers` decoder layers."""
        values = {k: v for k, v in asdict(self).items() if k != "groups"}
        if self.groups is None and self.ranks[1] == 0:
            # The mid level is off: its group count means nothing, so a small model need not have that many layers.
            values["num_mid_groups"] = min(self.num_mid_groups, num_layers)
        groups = self.groups if self.groups is not None else mid_groups(num_layers, values["num_mid_groups"])
        validate_groups(groups, num_layers)
        return MSPLoRAConfig(**values, groups=groups)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ranks"], d["alphas"], d["dropout"] = list(self.ranks), list(self.alphas), list(self.dropout)
        d["target_modules"] = list(self.target_modules)
        d["groups"] = None if self.groups is None else [list(g) for g in self.groups]
        return d


def mid_groups(num_layers: int, num_groups: int) -> tuple[tuple[int, int], ...]:
    """Split range(num_layers) into num_groups contiguous [start, end) ranges, sizes differing by at most
    one, the larger ones first (32 layers, 3 groups: 11, 11, 10). Integer arithmetic only: the paper's
    code used fractional boundaries and put layers of group 1 and 2 on group 0's adapter."""
    if num_groups < 1 or num_groups > num_layers:
        raise ConfigError(
            f"num_mid_groups={num_groups}: the model has {num_layers} decoder layers; expected 1 <= num_mid_groups <= {num_layers}"
        )
    base, extra = divmod(num_layers, num_groups)
    groups, start = [], 0
    for g in range(num_groups):
        end = start + base + (1 if g < extra else 0)
        groups.append((start, end))
        start = end
    return tuple(groups)


def validate_groups(groups: Sequence[tuple[int, int]], num_layers: int) -> None:
    """Groups must tile range(num_layers) contiguously, each non-empty."""
    expected_start = 0
    for s, e in groups:
        if s != expected_start or e <= s:
            raise ConfigError(
                f"groups={[list(g) for g in groups]}: expected contiguous non-empty [start, end) ranges covering 0..{num_layers}"
            )
        expected_start = e
    if expected_start != num_layers:
        raise ConfigError(
            f"groups={[list(g) for g in groups]} cover {expected_start} layers; the model has {num_layers}"
        )


def group_of_layer(groups: Sequence[tuple[int, int]], layer: int) -> int:
    for g, (s, e) in enumerate(groups):
        if s <= layer < e:
            return g
    raise ConfigError(f"layer {layer} is in no mid group of {[list(g) for g in groups]}")
