"""The quality study's statistics: paired intervals and the verdict rule (report.py applies them).

Two intervals for every comparison of an MSPLoRA arm with its LoRA reference, each of the difference
MSPLoRA minus LoRA, 95%:
- over seeds: the arms' results are paired by seed (same seed = the same batches in the same order), and the
  t-interval of the mean paired difference says how much the training seed moves it (3 seeds: t with 2 degrees
  of freedom, so it is wide);
- over test examples: each arm's per-example values averaged over its seeds, paired by example, and a
  percentile bootstrap (resampling examples, --n_boot times, seeded) of the mean difference says how much
  the choice of test examples moves it. For the loss the statistic is token-weighted (sum of the
  per-example loss differences / sum of their tokens), so its centre is the difference of the test losses.
A verdict is given only when BOTH intervals exclude 0 on the same side: "MSPLoRA better" or "LoRA better"
(better: lower loss, higher metric); otherwise "no difference resolved", and the intervals say how large a
difference could have been missed. One seed gives no seed interval and so no verdict.
"""

from __future__ import annotations

import math
import statistics

import numpy as np

# Two-sided 95% quantiles of Student's t by degrees of freedom (beyond the table: the normal 1.96 would be
# too narrow for few seeds, so more than 30 degrees of freedom use 2.042, the 30-df value: conservative).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228, 12: 2.179,
       15: 2.131, 20: 2.086, 30: 2.042}

BETTER, WORSE, UNRESOLVED = "MSPLoRA better", "LoRA better", "no difference resolved"


def t95(df: int) -> float:
    """The 95% quantile for df degrees of freedom (the next smaller tabulated df where df is not in the table)."""
    if df < 1:
        raise ValueError(f"df {df}: expected >= 1")
    return T95[max(k for k in T95 if k <= df)]


def seed_interval(diffs: list[float]) -> dict:
    """Mean of paired differences and its 95% t-interval (None with fewer than two differences)."""
    if not diffs:
        return {"n": 0, "mean": None, "ci": None}
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return {"n": 1, "mean": mean, "ci": None}
    half = t95(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"n": len(diffs), "mean": mean, "ci": (mean - half, mean + half)}


def bootstrap_interval(diffs, weights=None, *, n_boot: int = 10000, seed: int = 0) -> dict:
    """Percentile bootstrap of sum(diffs) / sum(weights) over resampled examples (weights 1 by default):
    {"n", "mean" (the statistic on all examples), "ci"}."""
    d = np.asarray(diffs, dtype=np.float64)
    w = np.ones_like(d) if weights is None else np.asarray(weights, dtype=np.float64)
    if d.size == 0:
        return {"n": 0, "mean": None, "ci": None}
    if d.shape != w.shape or not np.all(w > 0):
        raise ValueError("bootstrap_interval: expected one positive weight per difference")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(n_boot, d.size))
    boot = d[idx].sum(axis=1) / w[idx].sum(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"n": int(d.size), "mean": float(d.sum() / w.sum()), "ci": (float(lo), float(hi)), "n_boot": n_boot}


def side(ci, higher_is_better: bool) -> str:
    """Which arm an interval of (MSPLoRA - LoRA) favours, or UNRESOLVED when it holds 0 (or is missing)."""
    if ci is None:
        return UNRESOLVED
    lo, hi = ci
    if hi < 0:
        return WORSE if higher_is_better else BETTER
    if lo > 0:
        return BETTER if higher_is_better else WORSE
    return UNRESOLVED


def verdict(seed_ci, example_ci, higher_is_better: bool) -> str:
    """A side only when both intervals exclude 0 on that same side."""
    a, b = side(seed_ci, higher_is_better), side(example_ci, higher_is_better)
    return a if a == b else UNRESOLVED


def per_example_mean(by_seed: dict[int, list[float]], seeds: list[int]) -> list[float]:
    """Per example, the mean over `seeds` of each seed's per-example values (all of one length)."""
    rows = [by_seed[s] for s in seeds]
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"per-example values of different lengths over seeds {seeds}: {[len(r) for r in rows]}")
    return [statistics.fmean(col) for col in zip(*rows, strict=True)]


def compare_measure(msp: dict[int, float], lora: dict[int, float], msp_examples: dict[int, list[float]] | None,
                    lora_examples: dict[int, list[float]] | None, weights: list[float] | None, higher_is_better: bool,
                    n_boot: int = 10000) -> dict:
    """One measure (a loss or a metric) of one comparison: by-seed values of both arms (seed -> value) and,
    where there, per-example values by seed. Paired on the seeds both arms have."""
    seeds = sorted(set(msp) & set(lora))
    s = seed_interval([msp[k] - lora[k] for k in seeds])
    out = {"seeds": seeds, "mean_diff": s["mean"], "seed_ci": s["ci"], "example_ci": None}
    ex_seeds = [k for k in seeds if msp_examples and lora_examples and k in msp_examples and k in lora_examples]
    if ex_seeds:
        a, b = per_example_mean(msp_examples, ex_seeds), per_example_mean(lora_examples, ex_seeds)
        boot = bootstrap_interval([x - y for x, y in zip(a, b, strict=True)], weights, n_boot=n_boot)
        out.update(example_ci=boot["ci"], example_mean_diff=boot["mean"], n_examples=boot["n"])
    out["verdict"] = "not run yet" if not seeds else verdict(out["seed_ci"], out["example_ci"], higher_is_better)
    return out
