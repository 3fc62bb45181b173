"""What each scale learned, as numbers: the report dict (JSON-ready) and the scalars for TensorBoard.

Layout of a report (see docs/analysis.md for every field):

    "format", "version", "adapter"      what was analysed
    "global.q_proj", "mid.0.q_proj",    one entry per stored pair (MSPLoRA only), keyed as in the checkpoint
    "layer.3.q_proj"
    "delta.3.q_proj"                    layer 3's total update of q_proj (the only entries of a plain LoRA)
    "summary"     {target: ...}         means per level: effective rank, shares, overlaps, cross-layer cosine
    "decoupling"  {target: ...}         per layer: level norms and shares, subspace overlaps between levels
    "cross_layer" {target: ...}         cosine similarity of the layers' total updates
    "compare"                           the same for the --compare adapter, plus "versus" and "side_by_side"
"""

from __future__ import annotations

import math
import os
from itertools import combinations

import torch
from torch import nn

from msplora_dist.analysis.linalg import (
    DTYPE,
    GramSVD,
    block_sum,
    cosine_from_gram,
    overlap_stats,
    single_threaded,
    spectrum_stats,
    svd_from_grams,
)
from msplora_dist.analysis.sources import AdapterFactors, load_factors, msplora_factors

REPORT_FORMAT = "msplora-analysis"
REPORT_VERSION = 1
SIDES = ("column", "row")
LEVEL_NAMES = ("global", "mid", "layer")


def analyze_adapter(path: str | os.PathLike, *, compare: str | os.PathLike | None = None) -> dict:
    """The report of the adapter directory `path` (MSPLoRA, or a PEFT LoRA), optionally against `compare`."""
    return analyze_factors(load_factors(path), compare=load_factors(compare) if compare is not None else None)


def analyze_model(model: nn.Module, *, compare: str | os.PathLike | None = None) -> dict:
    """The report of the adapters of an in-memory model (under ZeRO-3, call it inside dist.zero.gathered of the adapters)."""
    from msplora_dist.adapters.inject import get_hierarchy
    from msplora_dist.adapters.io import adapter_metadata, adapter_state_dict

    factors = msplora_factors(get_hierarchy(model).config, adapter_metadata(model), adapter_state_dict(model), None)
    return analyze_factors(factors, compare=load_factors(compare) if compare is not None else None)


def analyze_factors(factors: AdapterFactors, *, compare: AdapterFactors | None = None) -> dict:
    """The report of `factors` (and of `compare`, side by side), one target at a time."""
    report = {"format": REPORT_FORMAT, "version": REPORT_VERSION, **_empty(factors)}
    other = _empty(compare) if compare is not None else None
    versus = {}
    # The Gram matrices (large GEMMs) use the caller's threads; the rest is small problems, see single_threaded.
    for t in factors.targets:
        space = TargetSpace(factors, t)
        other_space = TargetSpace(compare, t) if compare is not None and t in compare.targets else None
        with single_threaded():
            _analyze_target(space, report)
            if other_space is not None:
                _analyze_target(other_space, other)
                versus[t] = _versus(space, other_space)
    if compare is not None:
        for t in compare.targets:
            if t not in factors.targets:
                space = TargetSpace(compare, t)
                with single_threaded():
                    _analyze_target(space, other)
        report["compare"] = {**other, "versus": versus, "side_by_side": _side_by_side(report, other, versus)}
    return report


def _empty(f: AdapterFactors) -> dict:
    return {"adapter": f.info, "summary": {}, "decoupling": {}, "cross_layer": {}}


class TargetSpace:
    """Every stored pair of one target, with the two Gram matrices of all their factors:
    GB = B_all^T B_all and GA = A_all A_all^T over the concatenated (scaled) B and stacked A. Any sum of
    pairs (a level, a layer's total update) is a set of columns, and everything about it (singular values,
    inner products, subspace overlaps) comes from sub-blocks of GB and GA: one GEMM per side per target."""

    def __init__(self, f: AdapterFactors, target: str):
        self.f, self.target = f, target
        self.pairs = [p for p in f.pairs.values() if p.target == target]
        self.fin, self.fout = f.features[target]
        self.cols, spans, start = {}, {}, 0
        for p in self.pairs:
            self.cols[p.key] = torch.arange(start, start + p.rank)
            spans[p.key] = slice(start, start + p.rank)
            start += p.rank
        # One float64 buffer per side, each pair's factors converted (and B scaled) into its slice.
        self.B_all = torch.empty(self.fout, start, dtype=DTYPE)
        self.A_all = torch.empty(start, self.fin, dtype=DTYPE)
        for p in self.pairs:
            self.B_all[:, spans[p.key]].copy_(p.B).mul_(p.scale)
            self.A_all[spans[p.key]].copy_(p.A)
        self.GB, self.GA = self.B_all.T @ self.B_all, self.A_all @ self.A_all.T
        self.index = {p.key: i for i, p in enumerate(self.pairs)}
        self.K = block_sum(self.GB * self.GA, [p.rank for p in self.pairs])
        self._svds: dict[tuple[str, ...], GramSVD] = {}

    def layer_keys(self, layer: int) -> tuple[str, ...]:
        return tuple(p.key for p in self.f.layer_pairs(layer, self.target))

    def idx(self, keys: tuple[str, ...]) -> torch.Tensor:
        return torch.cat([self.cols[k] for k in keys]) if keys else torch.zeros(0, dtype=torch.long)

    def svd(self, keys: tuple[str, ...]) -> GramSVD:
        if keys not in self._svds:
            i = self.idx(keys)
            self._svds[keys] = svd_from_grams(self.GB[i][:, i], self.GA[i][:, i], min(len(i), self.fin, self.fout))
        return self._svds[keys]

    def factors(self, keys: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) of the sum of `keys`: the concatenated scaled B and the stacked A."""
        i = self.idx(keys)
        return self.B_all[:, i], self.A_all[i]

    def overlap(self, keys1: tuple[str, ...], keys2: tuple[str, ...], side: str) -> dict | None:
        i1, i2 = self.idx(keys1), self.idx(keys2)
        gram, n = (self.GB, self.fout) if side == "column" else (self.GA, self.fin)
        return _overlap(self.svd(keys1), self.svd(keys2), gram[i1][:, i2], side, n)


def _overlap(svd1: GramSVD, svd2: GramSVD, cross: torch.Tensor, side: str, n: int) -> dict | None:
    """Subspace overlap of two updates from their coefficient form and the cross Gram block of their factors."""
    w1, s1 = svd1.coefficients(side)
    w2, s2 = svd2.coefficients(side)
    return overlap_stats(w1.T @ cross @ w2, s1, s2, n)


def _analyze_target(space: TargetSpace, out: dict) -> None:
    """Add target `space.target`'s entries and sections to the report dict `out`."""
    f, t, pairs = space.f, space.target, space.pairs
    entries = {}
    if f.kind == "msplora":
        for p in pairs:
            where = {"group": p.index} if p.level == "mid" else {"layer": p.index} if p.level == "layer" else {}
            entries[p.key] = {"level": p.level, "target": t, **where, "rank": p.rank, "scale": p.scale,
                              **spectrum_stats(space.svd((p.key,)))}

    # Inner products between the layers' totals: D = C K C^T, C[l, p] = 1 when pair p is part of layer l.
    L = f.num_layers
    C = torch.zeros(L, len(pairs), dtype=DTYPE)
    for layer in range(L):
        for k in space.layer_keys(layer):
            C[layer, space.index[k]] = 1.0
    D = C @ space.K @ C.T

    for layer in range(L):
        keys = space.layer_keys(layer)
        entries[f"delta.{layer}.{t}"] = {"level": "delta", "target": t, "layer": layer,
                                         "rank": sum(f.pairs[k].rank for k in keys), "levels": list(keys),
                                         **spectrum_stats(space.svd(keys))}
    out.update(entries)

    decoupling = _decoupling(space, D) if f.kind == "msplora" else None
    cross = _cross_layer(space, D)
    summary = {"rank": {}, "effective_rank": {}}
    if f.kind == "msplora":
        for lv, name in enumerate(LEVEL_NAMES):
            level_entries = [entries[p.key] for p in pairs if p.level == name]
            if level_entries:
                summary["rank"][name] = f.info["ranks"][lv]
                summary["effective_rank"][name] = _mean(e["effective_rank"] for e in level_entries)
    deltas = [entries[f"delta.{layer}.{t}"] for layer in range(L)]
    summary["rank"]["delta"] = max((e["rank"] for e in deltas), default=0)
    summary["effective_rank"]["delta"] = _mean(e["effective_rank"] for e in deltas)
    summary["delta_frobenius_norm"] = _mean(e["frobenius_norm"] for e in deltas)
    summary["cross_layer_mean_cosine"] = cross["mean_offdiag"]
    if decoupling is not None:
        summary.update(decoupling["mean"])
        out["decoupling"][t] = decoupling
    out["summary"][t] = summary
    out["cross_layer"][t] = cross


def _decoupling(space: TargetSpace, D: torch.Tensor) -> dict:
    f, K = space.f, space.K
    layers = []
    for layer in range(f.num_layers):
        lp = f.layer_pairs(layer, space.target)
        ids = [space.index[p.key] for p in lp]
        dd = float(D[layer, layer])
        sq = [max(float(K[i, i]), 0.0) for i in ids]
        row = {"layer": layer, "group": f.group_of(layer),
               "norm": {p.level: math.sqrt(s) for p, s in zip(lp, sq, strict=True)} | {"delta": math.sqrt(max(dd, 0.0))},
               "norm_ratio": {p.level: (math.sqrt(s / dd) if dd > 0 else None) for p, s in zip(lp, sq, strict=True)},
               "energy_share": {p.level: (float(K[i, ids].sum()) / dd if dd > 0 else None) for p, i in zip(lp, ids, strict=True)},
               "sq_norm_share": {p.level: (s / sum(sq) if sum(sq) > 0 else None) for p, s in zip(lp, sq, strict=True)},
               "frobenius_cos": {}, "column_overlap": {}, "row_overlap": {}}
        for (p, i), (q, j) in combinations(zip(lp, ids, strict=True), 2):
            name = f"{p.level}-{q.level}"
            denom = math.sqrt(max(float(K[i, i]) * float(K[j, j]), 0.0))
            row["frobenius_cos"][name] = float(K[i, j]) / denom if denom > 0 else None
            for s in SIDES:
                row[f"{s}_overlap"][name] = space.overlap((p.key,), (q.key,), s)
        layers.append(row)
    mean = {}
    for field in ("norm", "norm_ratio", "energy_share", "sq_norm_share", "frobenius_cos"):
        names = {k for row in layers for k in row[field]}
        mean[field] = {k: _mean(row[field].get(k) for row in layers) for k in sorted(names, key=_level_order)}
    for s in SIDES:
        names = sorted({k for row in layers for k in row[f"{s}_overlap"]}, key=_level_order)
        for stat, suffix in (("mean_sq_cos", ""), ("weighted", "_weighted")):
            mean[f"{s}_overlap{suffix}"] = {k: _mean((row[f"{s}_overlap"].get(k) or {}).get(stat) for row in layers)
                                            for k in names}
    return {"layers": layers, "mean": mean}


def _cross_layer(space: TargetSpace, D: torch.Tensor) -> dict:
    f, t = space.f, space.target
    cos = cosine_from_gram(D)
    L = f.num_layers
    off = [(a, b) for a in range(L) for b in range(L) if a != b]
    out = {"layers": list(range(L)), "cosine": _matrix(cos),
           "mean_offdiag": _mean(float(cos[a, b]) for a, b in off),
           "mean_adjacent": _mean(float(cos[a, a + 1]) for a in range(L - 1))}
    if f.groups:
        out["groups"] = [list(g) for g in f.groups]
        out["mean_within_group"] = _mean(float(cos[a, b]) for a, b in off if f.group_of(a) == f.group_of(b))
        out["mean_across_groups"] = _mean(float(cos[a, b]) for a, b in off if f.group_of(a) != f.group_of(b))
    layer_ids = [space.index[f"layer.{layer}.{t}"] for layer in range(L) if f"layer.{layer}.{t}" in space.index]
    if f.kind == "msplora" and len(layer_ids) == L:
        lc = cosine_from_gram(space.K[layer_ids][:, layer_ids])
        out["layer_level"] = {"cosine": _matrix(lc), "mean_offdiag": _mean(float(lc[a, b]) for a, b in off)}
    return out


# ------------------------------------------------------------------------------------------------ comparison


def _versus(a: TargetSpace, b: TargetSpace) -> dict:
    """Layer by layer: how close the two adapters' total updates are (same shapes needed)."""
    t = a.target
    if (a.fin, a.fout) != (b.fin, b.fout):
        return {"comparable": False,
                "reason": f"{t} has (in, out) {[a.fin, a.fout]} here and {[b.fin, b.fout]} in the compared adapter"}
    out = {"comparable": True, "layers": [], "delta_cosine": [], "column_overlap": [], "row_overlap": [],
           "column_overlap_weighted": [], "row_overlap_weighted": []}
    for layer in range(min(a.f.num_layers, b.f.num_layers)):
        ka, kb = a.layer_keys(layer), b.layer_keys(layer)
        (B1, A1), (B2, A2) = a.factors(ka), b.factors(kb)
        s1, s2 = a.svd(ka), b.svd(kb)
        cb, ca = B1.T @ B2, A1 @ A2.T
        n1, n2 = float(s1.S.norm()), float(s2.S.norm())
        out["layers"].append(layer)
        out["delta_cosine"].append(float((cb * ca).sum()) / (n1 * n2) if n1 > 0 and n2 > 0 else None)
        for side, cross, n in (("column", cb, a.fout), ("row", ca, a.fin)):
            ov = _overlap(s1, s2, cross, side, n)
            out[f"{side}_overlap"].append(ov["mean_sq_cos"] if ov else None)
            out[f"{side}_overlap_weighted"].append(ov["weighted"] if ov else None)
    out["mean_delta_cosine"] = _mean(out["delta_cosine"])
    for key in ("column_overlap", "row_overlap", "column_overlap_weighted", "row_overlap_weighted"):
        out[f"mean_{key}"] = _mean(out[key])
    return out


def _side_by_side(this: dict, other: dict, versus: dict) -> dict:
    out = {}
    for t in this["summary"]:
        if t not in other["summary"]:
            continue
        a, b = this["summary"][t], other["summary"][t]
        out[t] = {
            "rank_delta": {"this": a["rank"]["delta"], "other": b["rank"]["delta"]},
            "effective_rank_delta": {"this": a["effective_rank"]["delta"], "other": b["effective_rank"]["delta"]},
            "delta_frobenius_norm": {"this": a["delta_frobenius_norm"], "other": b["delta_frobenius_norm"]},
            "cross_layer_mean_cosine": {"this": a["cross_layer_mean_cosine"], "other": b["cross_layer_mean_cosine"]},
            "mean_delta_cosine": versus.get(t, {}).get("mean_delta_cosine"),
        }
    return out


# ---------------------------------------------------------------------------------------------- TensorBoard


def tensorboard_scalars(report: dict, prefix: str = "analysis") -> dict[str, float]:
    """A few finite scalars per target, for SummaryWriter.add_scalar(tag, value, step):
    {prefix}/{target}/effective_rank/{level|delta}, .../sq_norm_share/{level}, .../column_overlap/{a-b},
    .../row_overlap/{a-b}, .../cross_layer_cosine, .../delta_norm; compare adds .../delta_cosine_vs_compare."""
    out: dict[str, float] = {}

    def put(tag: str, value) -> None:
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[f"{prefix}/{tag}"] = float(value)

    for t, s in report.get("summary", {}).items():
        for name, v in s.get("effective_rank", {}).items():
            put(f"{t}/effective_rank/{name}", v)
        for name, v in s.get("sq_norm_share", {}).items():
            put(f"{t}/sq_norm_share/{name}", v)
        for side in SIDES:
            for name, v in s.get(f"{side}_overlap", {}).items():
                put(f"{t}/{side}_overlap/{name}", v)
        put(f"{t}/cross_layer_cosine", s.get("cross_layer_mean_cosine"))
        put(f"{t}/delta_norm", s.get("delta_frobenius_norm"))
    for t, v in report.get("compare", {}).get("versus", {}).items():
        put(f"{t}/delta_cosine_vs_compare", v.get("mean_delta_cosine"))
    return out


# ------------------------------------------------------------------------------------------------ helpers


def _mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else None


def _matrix(m: torch.Tensor) -> list[list[float | None]]:
    return [[float(x) if math.isfinite(float(x)) else None for x in row] for row in m.tolist()]


def _level_order(name: str) -> tuple:
    order = {"global": 0, "mid": 1, "layer": 2, "delta": 3}
    return tuple(order.get(part, 9) for part in name.split("-"))


def report_entries(report: dict, level: str | None = None, target: str | None = None) -> dict[str, dict]:
    """The per-update entries of a report (the keys with a dot), optionally of one level and target."""
    return {k: v for k, v in report.items()
            if "." in k and isinstance(v, dict) and (level is None or v.get("level") == level)
            and (target is None or v.get("target") == target)}
