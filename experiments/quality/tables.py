"""What report.py computes and renders from one grid's results: per-arm aggregates, the comparisons (stats.py),
markdown tables and the plot. No file is written here except the plot."""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path

from experiments.quality import stats as st

# (MSPLoRA arm, LoRA arm, what the comparison asks)
COMPARISONS = (
    ("msp_qv_paper", "lora_qv_r64", "the paper's claim: MSPLoRA (64,32,16) vs LoRA r=64 on q,v, fewer parameters"),
    ("msp_qv_paper", "lora_qv_eq_paper", "equal parameters, the paper MSPLoRA's size (q,v)"),
    ("msp_qv_eq_lora64", "lora_qv_r64", "equal parameters, LoRA r=64's size (q,v)"),
    ("msp_all_eq_lora16", "lora_all_r16", "equal parameters, all linear projections, LoRA r=16's size"),
    ("msp_all_third", "lora_all_r16", "a third of the parameters, all linear projections"),
)
METRIC_NAMES = {"exact_match": "exact match", "chrf": "chrF"}


def finite(x) -> bool:
    return x is not None and isinstance(x, int | float) and math.isfinite(x)


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(results: list[dict], arms: list[dict]) -> dict[str, dict]:
    """Per arm: final test losses and metrics by seed, per-example values by seed, mean, sd, the chosen lr, the
    lr search, costs."""
    out = {}
    for arm in arms:
        mine = [r for r in results if r["arm"] == arm["name"]]
        finals = [r for r in mine if r["phase"] == "final"]
        ok = {r["seed"]: r for r in finals if r["status"] == "ok" and finite(r.get("final_eval_loss"))}
        seeds = sorted(ok)
        losses = [ok[s]["final_eval_loss"] for s in seeds]
        metric = {s: ok[s]["metric_mean"] for s in seeds if finite(ok[s].get("metric_mean"))}
        ev = {s: ok[s]["evaluation"] for s in seeds if ok[s].get("evaluation")}
        base = [r["base_eval_loss"] for r in ok.values() if finite(r.get("base_eval_loss"))]
        search = {r["lr"]: (r["final_eval_loss"] if r["status"] == "ok" else None) for r in mine if r["phase"] == "lr"}
        mean, sd = mean_sd(losses)
        m_mean, m_sd = mean_sd(list(metric.values()))
        out[arm["name"]] = {
            "arm": arm, "by_seed": dict(zip(seeds, losses, strict=True)), "mean": mean, "sd": sd, "n": len(losses),
            "metric_by_seed": metric, "metric_mean": m_mean, "metric_sd": m_sd,
            "metric": next((e["metric"] for e in ev.values()), None),
            "example_scores": {s: e["scores"] for s, e in ev.items()},
            "example_loss_sums": {s: e["example_loss_sums"] for s, e in ev.items()},
            "example_loss_tokens": next((e["example_loss_tokens"] for e in ev.values()), None),
            "lrs": sorted({r["lr"] for r in finals}), "failed": [r["name"] for r in mine if r["status"] != "ok"],
            "base_test_loss": statistics.mean(base) if base else None, "lr_search": dict(sorted(search.items())),
            "wall_s": [r["wall_s"] for r in mine if r["status"] == "ok"],
            "tokens_per_s": [r["tokens_per_s_median"] for r in mine if finite(r.get("tokens_per_s_median"))],
            "steps": sorted({r.get("steps") for r in finals if r.get("steps")}),
        }
    return out


def compare(stats: dict, msp: str, lora: str, n_boot: int = 10000) -> dict | None:
    """Both measures of one comparison, MSPLoRA minus LoRA: the test loss (lower is better; per example the
    token-weighted loss sums) and the task metric (higher is better)."""
    if msp not in stats or lora not in stats:
        return None
    a, b = stats[msp], stats[lora]
    res = {"msp": msp, "lora": lora, "params_ratio": a["arm"]["params"] / b["arm"]["params"]}
    res["loss"] = st.compare_measure(a["by_seed"], b["by_seed"], a["example_loss_sums"], b["example_loss_sums"],
                                     a["example_loss_tokens"], higher_is_better=False, n_boot=n_boot)
    res["metric"] = st.compare_measure(a["metric_by_seed"], b["metric_by_seed"], a["example_scores"], b["example_scores"], None,
                                       higher_is_better=True, n_boot=n_boot)
    base = b["base_test_loss"]
    if finite(base) and b["mean"] is not None and base - b["mean"] > 0:
        res["lora_gain"] = base - b["mean"]  # what LoRA gained on the base model, nats
        if a["mean"] is not None:
            res["gain_ratio"] = (base - a["mean"]) / res["lora_gain"]
    return res


# --- markdown ---------------------------------------------------------------------------------------------

def fmt(x, digits: int = 4) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def fmt_ci(ci, digits: int = 4) -> str:
    return f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]" if ci else "–"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_arms(arms: list[dict]) -> str:
    ref = next((a for a in arms if a["name"] == "lora_qv_r64"), None)
    rows = []
    for a in arms:
        targets = ",".join(t.removesuffix("_proj") for t in a["targets"])
        rel = f"{a['params'] / ref['params']:.2f}x" if ref else ""
        rows.append([f"`{a['name']}`", a["kind"], "({}, {}, {})".format(*a["ranks"]), targets, f"{a['params']:,}", rel, a.get("note", "")])
    return table(["arm", "kind", "ranks (G, M, L)", "targets", "trainable params", "vs LoRA r=64 q,v", "what it tests"], rows)


def render_arm_table(stats: dict, metric: str | None) -> str:
    name = METRIC_NAMES.get(metric, metric or "metric")
    rows = []
    for arm_name, s in stats.items():
        a = s["arm"]
        lr = ", ".join(f"{x:g}" for x in s["lrs"]) or "–"
        per_seed = ", ".join(f"s{k}: {v:.4f}" for k, v in s["by_seed"].items()) or "–"
        rows.append([f"`{arm_name}`", a["kind"], f"{a['params']:,}", lr, f"{fmt(s['mean'])} ± {fmt(s['sd'])} (n={s['n']})", per_seed,
                     f"{fmt(s['metric_mean'], 3)} ± {fmt(s['metric_sd'], 3)}", fmt(s["base_test_loss"])])
    return table(["arm", "kind", "trainable params", "lr (chosen on dev)", "test loss mean ± sd", "per seed", f"test {name} mean ± sd",
                  "base model loss"], rows)


def render_comparisons(stats: dict, metric: str | None, n_boot: int = 10000) -> tuple[str, list[dict]]:
    name = METRIC_NAMES.get(metric, metric or "metric")
    rows, out = [], []
    for msp, lora, what in COMPARISONS:
        c = compare(stats, msp, lora, n_boot)
        if c is None:  # an arm this grid does not run
            continue
        out.append(dict(c, question=what))
        lo, me = c["loss"], c["metric"]
        rows.append([what, f"`{msp}` vs `{lora}`", f"{c['params_ratio']:.2f}x", len(lo["seeds"]),
                     fmt(lo["mean_diff"]) if lo["mean_diff"] is None else f"{lo['mean_diff']:+.4f}", fmt_ci(lo["seed_ci"]),
                     fmt_ci(lo["example_ci"]), f"**{lo['verdict']}**",
                     "–" if me["mean_diff"] is None else f"{me['mean_diff']:+.3f}", fmt_ci(me["seed_ci"], 3), fmt_ci(me["example_ci"], 3),
                     f"**{me['verdict']}**", fmt(c.get("gain_ratio"), 3)])
    header = ["question", "arms", "params ratio", "seeds", "loss diff", "95% CI seeds", "95% CI examples", "verdict (loss)",
              f"{name} diff", "95% CI seeds", "95% CI examples", f"verdict ({name})", "gain ratio"]
    return table(header, rows), out


def bounds(measure: dict) -> tuple[float, float] | None:
    """The range of differences that the two intervals together leave open (their union: a difference is ruled
    out only where both exclude it), or None without a seed interval."""
    cis = [ci for ci in (measure["seed_ci"], measure["example_ci"]) if ci]
    return (min(c[0] for c in cis), max(c[1] for c in cis)) if measure["seed_ci"] else None


def signed(x: float, digits: int = 4) -> str:
    """x with a sign to `digits` places; a nonzero value that would print as zero in scientific notation, so a
    bound that barely crosses 0 does not read as 0."""
    return f"{x:+.1e}" if x and abs(x) < 0.5 * 10 ** -digits else f"{x:+.{digits}f}"


def render_reading(comparisons: list[dict], metric: str | None) -> str:
    """One sentence per comparison: its verdict, and where none is resolved how large a difference the intervals
    still allow, the loss also as a share of the LoRA arm's loss drop from the base model (what LoRA gained)."""
    name = METRIC_NAMES.get(metric, metric or "metric")
    lines = []
    for c in comparisons:
        lo, me = c["loss"], c["metric"]
        b = bounds(lo)
        if b is None:
            continue
        gain = c.get("lora_gain")
        share = (f" ({100 * b[0] / gain:+.1f}% to {100 * b[1] / gain:+.1f}% of the {gain:.3f} nats LoRA gained on the base)"
                 if gain else "")
        text = f"- `{c['msp']}` vs `{c['lora']}` ({c['params_ratio']:.2f}x the parameters): loss **{lo['verdict']}**"
        if lo["verdict"] == st.UNRESOLVED:
            text += f", a difference between {signed(b[0])} and {signed(b[1])} nats still open{share}"
        mb = bounds(me)
        if mb is not None:
            text += f"; {name} **{me['verdict']}**"
            if me["verdict"] == st.UNRESOLVED:
                text += f", between {mb[0]:+.3f} and {mb[1]:+.3f} still open"
        lines.append(text + ".")
    if not lines:
        return ""
    return ("**Reading** (MSPLoRA minus LoRA; a range still open spans both intervals: the loss could be that much "
            "higher (positive: worse) or lower without either interval ruling it out):\n\n" + "\n".join(lines))


def render_lr_search(stats: dict, search_seed) -> str:
    lrs = sorted({lr for s in stats.values() for lr in s["lr_search"]})
    rows, edges = [], []
    for arm_name, s in stats.items():
        if not s["lr_search"]:
            continue
        scored = [(v, k) for k, v in s["lr_search"].items() if finite(v)]
        best = min(scored)[1] if scored else None
        searched = sorted(s["lr_search"])
        if best is not None and best in (searched[0], searched[-1]) and len(searched) > 1:
            edges.append(arm_name)
        rows.append([f"`{arm_name}`"] + [("**" + fmt(s["lr_search"][lr]) + "**") if lr == best else
                                          (fmt(s["lr_search"][lr]) if lr in s["lr_search"] else "") for lr in lrs])
    if not rows:
        return ""
    text = (f"**Learning-rate search** (dev loss, seed {search_seed}; bold: chosen; blank: not searched for that arm; a rate one "
            "grid step past an edge is added when the edge wins):\n\n" + table(["arm"] + [f"lr {lr:g}" for lr in lrs], rows))
    if edges:
        text += f"\n\nStill chosen at an edge of its searched range: {', '.join(f'`{e}`' for e in edges)}."
    return text


def render_cost(stats: dict, results: list[dict]) -> str:
    rows = [[f"`{n}`", f"{statistics.median(s['wall_s']):.0f}" if s["wall_s"] else "–",
             f"{statistics.median(s['tokens_per_s']):,.0f}" if s["tokens_per_s"] else "–", ", ".join(map(str, s["steps"])) or "–"]
            for n, s in stats.items()]
    total = sum(r["wall_s"] for r in results)
    return (f"**Cost** (cells ran {results[0].get('concurrent_jobs', 1)} at a time on one device; wall time is a cell's own, model "
            "loading, engine set-up and the final cells' generation included; a worker process's first cell also pays the imports "
            f"and the process group; {total / 60:.1f} cell-minutes in all):\n\n"
            + table(["arm", "median wall s per cell", "median tokens/s (trainer)", "steps"], rows))


def plot_vs_params(stats: dict, path: Path, title: str, metric: str | None = None) -> Path | None:
    """Test loss (and the metric, where there) against trainable parameters: seeds as dots, mean +- sd."""
    points = [s for s in stats.values() if s["n"]]
    if not points:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [("by_seed", "mean", "sd", "test loss (nats)")]
    if any(s["metric_by_seed"] for s in points):
        panels.append(("metric_by_seed", "metric_mean", "metric_sd", f"test {METRIC_NAMES.get(metric, metric)}"))
    fig = Figure(figsize=(6.5 * len(panels), 4.6), dpi=110)
    FigureCanvasAgg(fig)
    colors = {"LoRA": "#1f77b4", "MSPLoRA": "#d62728"}
    for k, (by, mean, sd, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for s in points:
            if not s[by]:
                continue
            arm = s["arm"]
            x, marker = arm["params"], "o" if len(arm["targets"]) == 2 else "s"
            ax.scatter([x] * len(s[by]), list(s[by].values()), color=colors[arm["kind"]], alpha=0.35, s=14, marker=marker)
            ax.errorbar([x], [s[mean]], yerr=[s[sd] or 0.0], color=colors[arm["kind"]], marker=marker, ms=7, capsize=4, lw=1.5)
            ax.annotate(arm["name"], (x, s[mean]), textcoords="offset points", xytext=(6, 4), fontsize=7)
        base = [s["base_test_loss"] for s in points if finite(s["base_test_loss"])]
        if by == "by_seed" and base:
            ax.axhline(statistics.mean(base), color="gray", ls=":", lw=1)
            ax.text(0.01, 0.98, f"base model (no adapter): {statistics.mean(base):.3f}", transform=ax.transAxes, va="top",
                    fontsize=7, color="gray")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(label)
        for kind, c in colors.items():
            ax.scatter([], [], color=c, label=kind)
        ax.scatter([], [], color="k", marker="o", label="q, v")
        ax.scatter([], [], color="k", marker="s", label="all linear")
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(title + " (mean ± sd over seeds; dots: seeds)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def rel_link(target: Path, md: Path) -> str:
    return Path(os.path.relpath(target, md.parent)).as_posix()
