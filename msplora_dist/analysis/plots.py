"""The PNG plots of a report, drawn from the report dict alone.

matplotlib is used through Figure and the Agg canvas directly: no pyplot, no global backend switch, so a
trainer that calls this keeps whatever backend it had. figure_makers(report) lists (file name, caption,
how to read it, draw()) for render.write_report, which saves them and shows them in index.html.
"""

from __future__ import annotations

import math
from pathlib import Path

from msplora_dist.analysis.report import LEVEL_NAMES, SIDES, report_entries
from msplora_dist.errors import ConfigError

COLORS = {"global": "#1f77b4", "mid": "#ff7f0e", "layer": "#2ca02c", "delta": "#222222"}
PAIR_COLORS = {"global-mid": "#9467bd", "global-layer": "#d62728", "mid-layer": "#17becf"}
THIS_OTHER = {"this": "#1f77b4", "compare": "#d62728"}


def figure_makers(report: dict) -> list:
    """(file name, caption, how to read, draw()) for each plot; draw() returns a Figure or None."""
    try:
        import matplotlib  # noqa: F401  (a declared dependency; fail early with a clear message)
    except ImportError:
        raise ConfigError("matplotlib is not installed; expected it for the plots (pip install matplotlib), "
                          "or call write_report(..., plots=False)") from None
    makers = [
        ("spectra.png", "Singular values of each level's scaled update s·B·A",
         "One panel per target, log scale. Each level's curve is its spectrum (for mid and layer: the median over "
         "groups / layers, the band spans min to max); the dashed black curve is the layer's total update Δ. "
         "A level whose curve drops by orders of magnitude after a few values has collapsed: only those few "
         "directions carry signal and the rest of its rank is wasted. A flat curve uses its whole rank.",
         lambda: _plot_spectra(report)),
        ("level_share.png", "How much of each layer's update each level carries",
         "Per layer, the bars split Σ‖s·B·A‖²_F over the three levels (they add up to 1). The black line (right "
         "axis) is ‖Δ_l‖_F, how much the layer changes in total. A level with a thin bar everywhere contributes "
         "little; dotted lines mark the mid-level groups.",
         lambda: _plot_level_share(report)),
        ("overlap.png", "Decoupling: subspace overlap between the levels of each layer",
         "Mean squared cosine of the principal angles between two levels' column spaces (solid, output side) and "
         "row spaces (dashed, input side), per layer, on a log scale: 1 means the same directions, 0 orthogonal ones. "
         "Each broad faint line is what random subspaces of the same sizes would give. A curve on its faint line: "
         "the two levels learned unrelated directions (decoupled); a curve near 1: they learned the same directions "
         "(redundant, one of them could be smaller). Points on the bottom edge are at or below it (0 included).",
         lambda: _plot_overlap(report)),
        ("cross_layer.png", "Cosine similarity between the layers' total updates Δ_l",
         "Cell (i, j) is the cosine similarity of the flattened Δ_i and Δ_j. Shared levels make layers similar; "
         "bright blocks along the diagonal that follow the mid-level groups (dotted lines) show the groups at work. "
         "Near 0 off the diagonal: every layer learned its own update.",
         lambda: _plot_cross_layer({"this": report})),
    ]
    if "compare" in report:
        other = report["compare"]
        makers += [
            ("compare_effective_rank.png", "Effective rank of each layer's total update: this adapter vs --compare",
             "Higher means the layer's update spreads over more directions. The dotted lines are the rank bounds.",
             lambda: _plot_compare_erank(report, other)),
            ("compare_spectra.png", "Spectra of the layers' total updates: this adapter vs --compare",
             "Median over layers (band: min to max) of the singular values of Δ_l, log scale.",
             lambda: _plot_compare_spectra(report, other)),
            ("compare_similarity.png", "How close the two adapters' updates are, layer by layer",
             "Cosine similarity of Δ_l between the two adapters, and the energy-weighted overlap of their column and "
             "row spaces (the share of each update's energy inside the other's subspace). 1: the same update "
             "(cosine) or the same directions (overlap); 0: unrelated.",
             lambda: _plot_compare_similarity(report, other)),
            ("compare_cross_layer.png", "Cross-layer similarity: this adapter vs --compare, side by side",
             "As for the cross-layer plot above, side by side.",
             lambda: _plot_cross_layer({"this": report, "compare": other})),
        ]
    return makers


def _grid(n: int, *, ncols: int = 4, w: float = 4.6, h: float = 3.4):
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    width = max(w * ncols, 7.5)        # a one-panel figure still has room for its title and legend
    fig = Figure(figsize=(width, (h + 0.6 * (width / ncols - w) / w) * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _suptitle(fig, text: str) -> None:
    """A figure title wrapped to the figure's width (a one-panel figure is narrow)."""
    import textwrap

    width_chars = max(30, int(fig.get_figwidth() * 8.5))
    fig.suptitle("\n".join(textwrap.wrap(text, width_chars)), fontsize=13)


def _fig_legend(fig, handles, labels=None) -> None:
    """One legend under all panels, with as many columns as fit the figure's width."""
    labels = labels if labels is not None else [h.get_label() for h in handles]
    widths = sorted((0.075 * len(label) + 0.7 for label in labels), reverse=True)
    ncol = 1
    while ncol < len(labels) and sum(widths[:ncol + 1]) < fig.get_figwidth() - 0.3:
        ncol += 1
    fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize=10)


def save_figure(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)


def _targets(report: dict) -> list[str]:
    return list(report.get("summary", {}))


def _band(ax, spectra: list[list[float]], color: str, label: str, *, dashed: bool = False, band: bool = True) -> bool:
    """Median curve (and min..max band) of several spectra; False when all are zero."""
    spectra = [s for s in spectra if s and any(v and v > 0 for v in s)]
    if not spectra:
        return False
    n = max(len(s) for s in spectra)
    cols = [[s[i] for s in spectra if i < len(s) and s[i] is not None and s[i] > 0] for i in range(n)]
    xs = [i + 1 for i in range(n) if cols[i]]
    med = [sorted(c)[len(c) // 2] if len(c) % 2 else 0.5 * (sorted(c)[len(c) // 2 - 1] + sorted(c)[len(c) // 2])
           for c in cols if c]
    ax.plot(xs, med, color=color, lw=2.2 if not dashed else 1.4, ls="--" if dashed else "-", zorder=1 if dashed else 2,
            marker="o" if n <= 16 and not dashed else None, ms=3, label=label)
    if band and len(spectra) > 1:
        ax.fill_between(xs, [min(c) for c in cols if c], [max(c) for c in cols if c], color=color, alpha=0.18, lw=0)
    return True


def _log_y(ax) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if _few_decades(ax) else ""))


def _few_decades(ax) -> bool:
    lo, hi = ax.get_ylim()
    return lo > 0 and hi / lo < 30


def _layer_axis(ax, n: int) -> None:
    step = max(1, math.ceil(n / 16))
    ax.set_xticks(range(0, n, step))


def _plot_spectra(report: dict):
    targets = _targets(report)
    fig, axes = _grid(len(targets))
    for ax, t in zip(axes, targets, strict=True):
        drawn = False
        summary = report["summary"][t]
        for name in ("delta", *LEVEL_NAMES):
            ents = list(report_entries(report, name, t).values())
            if not ents:
                continue
            erank = summary["effective_rank"].get(name)
            label = f"{name} (r={summary['rank'].get(name)}, eff. rank {erank:.1f})" if erank is not None else name
            if name == "delta":
                label = f"total Δ (r≤{summary['rank']['delta']}, eff. rank {erank:.1f})" if erank is not None else "total Δ"
            if len(ents) > 1 and name != "delta":
                label += f", {len(ents)} {'groups' if name == 'mid' else 'layers'}"
            drawn |= _band(ax, [e["singular_values"] for e in ents], COLORS[name], label,
                           dashed=name == "delta", band=name != "delta")
        ax.set_title(t, fontsize=12, fontweight="bold")
        ax.set_xlabel("singular value index (1 = largest)")
        ax.set_ylabel("singular value of s·B·A")
        if drawn:
            _log_y(ax)
            handles, labels = ax.get_legend_handles_labels()
            order = sorted(range(len(labels)), key=lambda i: labels[i].startswith("total"))
            ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=7.5, loc="upper right", framealpha=0.85)
        else:
            ax.text(0.5, 0.5, "every update is zero\n(untrained adapter?)", ha="center", va="center", transform=ax.transAxes)
        ax.grid(True, which="major", alpha=0.3)
    _suptitle(fig, "Spectra per level (mid, layer: median over groups / layers, band = min to max)")
    return fig


def _group_lines(ax, groups, *, vertical: bool = True, horizontal: bool = False) -> None:
    for s, _ in (groups or [])[1:]:
        if vertical:
            ax.axvline(s - 0.5, color="k", ls=":", lw=1, alpha=0.7)
        if horizontal:
            ax.axhline(s - 0.5, color="k", ls=":", lw=1, alpha=0.7)


def _plot_level_share(report: dict):
    dec = report.get("decoupling", {})
    targets = [t for t in _targets(report) if t in dec]
    if not targets:
        return None
    fig, axes = _grid(len(targets))
    groups = report.get("adapter", {}).get("groups")
    for ax, t in zip(axes, targets, strict=True):
        rows = dec[t]["layers"]
        xs = [r["layer"] for r in rows]
        bottom = [0.0] * len(rows)
        for name in LEVEL_NAMES:
            vals = [(r["sq_norm_share"].get(name) or 0.0) for r in rows]
            if not any(name in r["sq_norm_share"] for r in rows):
                continue
            ax.bar(xs, vals, bottom=bottom, color=COLORS[name], label=name, width=0.85)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax.set_ylim(0, 1.0)
        ax.set_xlim(-0.6, len(rows) - 0.4)
        _layer_axis(ax, len(rows))
        _group_lines(ax, groups)
        ax.set_title(t, fontsize=12, fontweight="bold")
        ax.set_xlabel("layer")
        ax.set_ylabel("share of Σ‖s·B·A‖²_F")
        twin = ax.twinx()
        twin.plot(xs, [r["norm"]["delta"] for r in rows], color="k", marker=".", lw=1.4, label="‖Δ_l‖_F (right axis)")
        top = max(r["norm"]["delta"] for r in rows)
        twin.set_ylim(0, top * 1.08 if top > 0 else 1.0)
        if top == 0:
            ax.text(0.5, 0.5, "every update is zero\n(untrained adapter?)", ha="center", va="center", transform=ax.transAxes)
        twin.set_ylabel("‖Δ_l‖_F")
        handles, labels = ax.get_legend_handles_labels()
        h2, l2 = twin.get_legend_handles_labels()
    _fig_legend(fig, handles + h2, labels + l2)
    _suptitle(fig, "Level share of each layer's update (bars) and the size of the total update (line)")
    return fig


def _plot_overlap(report: dict):
    """Log y axis: overlaps of large random subspaces are ~r/n (0.004 for r = 16 in 4096 dimensions),
    so a linear axis would squash everything that is not close to 1 onto the floor."""
    dec = report.get("decoupling", {})
    targets = [t for t in _targets(report) if t in dec and dec[t]["layers"] and dec[t]["layers"][0]["column_overlap"]]
    if not targets:
        return None
    fig, axes = _grid(len(targets))
    groups = report.get("adapter", {}).get("groups")
    pairs_seen: set[str] = set()
    for ax, t in zip(axes, targets, strict=True):
        rows = dec[t]["layers"]
        xs = [r["layer"] for r in rows]
        curves, chances = [], []
        for pair, color in PAIR_COLORS.items():
            for side, ls in zip(SIDES, ("-", "--"), strict=True):
                vals = [(r[f"{side}_overlap"].get(pair) or {}) for r in rows]
                if any(vals):
                    chance = [v["chance"] for v in vals if v]
                    curves.append((color, ls, [v.get("mean_sq_cos", float("nan")) for v in vals], sum(chance) / len(chance)))
                    chances += chance
                    pairs_seen.add(pair)
        floor = min(0.1, max(1e-4, min(chances, default=0.01) / 5))
        for color, ls, ys, chance in curves:
            ax.axhline(chance, color=color, ls=ls, lw=4, alpha=0.22)
            ax.plot(xs, [max(y, floor) for y in ys], color=color, ls=ls, marker="." if len(xs) <= 40 else None)
        if not curves:
            ax.text(0.5, 0.5, "no pair of non-zero levels", ha="center", va="center", transform=ax.transAxes)
        _log_y(ax)
        ax.set_ylim(floor, 1.3)
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set_xlim(-0.5, len(rows) - 0.5)
        _layer_axis(ax, len(rows))
        _group_lines(ax, groups)
        ax.set_title(t, fontsize=12, fontweight="bold")
        ax.set_xlabel("layer")
        ax.set_ylabel("subspace overlap (mean cos² of angles)")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=PAIR_COLORS[p], lw=2, label=p) for p in PAIR_COLORS if p in pairs_seen]
    handles += [Line2D([], [], color="k", ls="-", label="output side (column spaces)"),
                Line2D([], [], color="k", ls="--", label="input side (row spaces)"),
                Line2D([], [], color="0.5", lw=4, alpha=0.3, label="broad faint line: what random subspaces give")]
    _fig_legend(fig, handles)
    _suptitle(fig, "Decoupling of the levels: subspace overlap per layer (log scale, 1 = same directions)")
    return fig


def _plot_cross_layer(reports: dict):
    """One heat map per target and report ("this" and optionally "compare" side by side)."""
    names = list(reports)
    targets = [t for t in _targets(reports["this"]) if all(t in r.get("cross_layer", {}) for r in reports.values())]
    if not targets:
        return None
    from matplotlib.figure import Figure

    per_row = min(4 // len(names), len(targets))           # targets per row; "this" and "compare" side by side
    ncols, nrows = per_row * len(names), math.ceil(len(targets) / per_row)
    fig = Figure(figsize=(4.4 * ncols + 1.2, 4.2 * nrows + 0.6), layout="compressed")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    cells = [(t, n) for t in targets for n in names]
    flat = axes.ravel()
    for ax in flat[len(cells):]:
        ax.set_visible(False)
    image = None
    for ax, (t, n) in zip(flat, cells, strict=False):
        rep = reports[n]
        cl = rep["cross_layer"][t]
        m = [[float("nan") if v is None else v for v in row] for row in cl["cosine"]]
        image = ax.imshow(m, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        L = len(m)
        if L <= 8:
            for i in range(L):
                for j in range(L):
                    if not math.isnan(m[i][j]):
                        ax.text(j, i, f"{m[i][j]:.2f}", ha="center", va="center", fontsize=7,
                                color="white" if abs(m[i][j]) > 0.6 else "black")
        _group_lines(ax, rep.get("adapter", {}).get("groups"), horizontal=True)
        _layer_axis(ax, L)
        ax.set_yticks(range(0, L, max(1, math.ceil(L / 16))))
        kind = rep.get("adapter", {}).get("kind", "")
        who = f"{'this' if n == 'this' else 'compare'} ({kind}): " if len(names) > 1 else ""
        mean = cl.get("mean_offdiag")
        ax.set_title(f"{who}{t}" + (f"\nmean off-diagonal {fmt(mean)}" if mean is not None else ""), fontsize=11)
        ax.set_xlabel("layer")
        ax.set_ylabel("layer")
    fig.colorbar(image, ax=list(flat[:len(cells)]), shrink=min(0.8, 2.0 / nrows), label="cosine similarity of Δ_i and Δ_j")
    _suptitle(fig, "Cross-layer similarity of the total updates")
    return fig


def _delta_series(report: dict, t: str, field: str) -> tuple[list[int], list]:
    ents = sorted(report_entries(report, "delta", t).values(), key=lambda e: e["layer"])
    return [e["layer"] for e in ents], [e[field] for e in ents]


def _compare_targets(report: dict, other: dict) -> list[str]:
    return [t for t in _targets(report) if t in other.get("summary", {})]


def _plot_compare_erank(report: dict, other: dict):
    targets = _compare_targets(report, other)
    if not targets:
        return None
    fig, axes = _grid(len(targets))
    for ax, t in zip(axes, targets, strict=True):
        for who, rep in (("this", report), ("compare", other)):
            xs, ys = _delta_series(rep, t, "effective_rank")
            kind = rep["adapter"].get("kind")
            rank = rep["summary"][t]["rank"]["delta"]
            style = dict(lw=2.8, marker="o", ms=4) if who == "this" else dict(lw=1.5, ls="--", marker="x", ms=5)
            ax.plot(xs, ys, color=THIS_OTHER[who], label=f"{who} ({kind}, rank ≤ {rank})", **style)
            ax.axhline(rank, color=THIS_OTHER[who], ls=":", lw=1)
        ax.set_ylim(bottom=0)
        _layer_axis(ax, len(xs))
        ax.set_title(t, fontsize=12, fontweight="bold")
        ax.set_xlabel("layer")
        ax.set_ylabel("effective rank of Δ_l")
        ax.legend(fontsize=8, loc="lower right", framealpha=0.85)
        ax.grid(True, alpha=0.3)
    _suptitle(fig, "Effective rank of each layer's total update (dotted: the rank bound)")
    return fig


def _plot_compare_spectra(report: dict, other: dict):
    targets = _compare_targets(report, other)
    if not targets:
        return None
    fig, axes = _grid(len(targets))
    for ax, t in zip(axes, targets, strict=True):
        drawn = False
        for who, rep in (("this", report), ("compare", other)):
            spectra = [e["singular_values"] for e in report_entries(rep, "delta", t).values()]
            drawn |= _band(ax, spectra, THIS_OTHER[who], f"{who} ({rep['adapter'].get('kind')})")
        if drawn:
            _log_y(ax)
            ax.legend(fontsize=8, loc="upper right")
        ax.set_title(t, fontsize=12, fontweight="bold")
        ax.set_xlabel("singular value index (1 = largest)")
        ax.set_ylabel("singular value of Δ_l")
        ax.grid(True, alpha=0.3)
    _suptitle(fig, "Spectra of the total updates Δ_l (median over layers, band = min to max)")
    return fig


def _plot_compare_similarity(report: dict, other: dict):
    versus = report.get("compare", {}).get("versus", {})
    targets = [t for t in _compare_targets(report, other) if versus.get(t, {}).get("comparable")]
    if not targets:
        return None
    fig, axes = _grid(len(targets))
    for ax, t in zip(axes, targets, strict=True):
        v = versus[t]
        xs = v["layers"]
        _layer_axis(ax, len(xs))
        nan = float("nan")
        ax.plot(xs, [nan if y is None else y for y in v["delta_cosine"]], color="k", marker="o", ms=3, lw=2,
                label="cosine of Δ_l")
        ax.plot(xs, [nan if y is None else y for y in v["column_overlap_weighted"]], color="#9467bd", ls="-",
                label="output-side overlap (weighted)")
        ax.plot(xs, [nan if y is None else y for y in v["row_overlap_weighted"]], color="#9467bd", ls="--",
                label="input-side overlap (weighted)")
        ax.axhline(0, color="0.5", lw=0.8)
        lo = min([0.0] + [y for y in v["delta_cosine"] if y is not None])
        ax.set_ylim(min(-0.05, lo - 0.05), 1.02)
        ax.set_title(t, fontsize=12, fontweight="bold")
        ax.set_xlabel("layer")
        ax.set_ylabel("similarity (this vs compare)")
        ax.legend(fontsize=8, loc="best", framealpha=0.85)
        ax.grid(True, alpha=0.3)
    _suptitle(fig, "This adapter vs --compare, layer by layer")
    return fig


def fmt(v, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        text = f"{v:.{digits}f}"
        return text[1:] if text.startswith("-") and not text.strip("-0.") else text
    return str(v)
