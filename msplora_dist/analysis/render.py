"""The report on disk: report.json, PNG plots and an index.html that shows them, written atomically.

Everything is drawn from the report dict alone: write_report(json.load(...), out) redraws a saved one.
The plots themselves are in plots.py.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path

from msplora_dist.analysis.plots import figure_makers, fmt, save_figure
from msplora_dist.analysis.report import LEVEL_NAMES
from msplora_dist.errors import ConfigError
from msplora_dist.utils.fileio import write_dir_atomically

REPORT_NAME = "report.json"
INDEX_NAME = "index.html"


def write_report(report: dict, out_dir: str | os.PathLike, *, plots: bool = True) -> Path:
    """Write report.json, the plots (plots=True) and index.html into `out_dir`, atomically: a reader sees
    the previous report or the new one. An existing `out_dir` is replaced only if it is empty or an
    earlier report (it has report.json), and never if it is or contains an analysed adapter."""
    out = Path(out_dir)
    _check_out_dir(out, report)
    figures = figure_makers(report) if plots else []

    def write(tmp: Path) -> None:
        (tmp / REPORT_NAME).write_text(json.dumps(_clean(report), indent=1, allow_nan=False) + "\n")
        made = []
        for name, caption, how_to_read, draw in figures:
            fig = draw()
            if fig is None:
                continue
            save_figure(fig, tmp / name)
            made.append((name, caption, how_to_read))
        (tmp / INDEX_NAME).write_text(_index_html(report, made))

    return write_dir_atomically(out, write)


def _check_out_dir(out: Path, report: dict) -> None:
    resolved = out.resolve()
    adapters = [report.get("adapter", {}).get("path"), report.get("compare", {}).get("adapter", {}).get("path")]
    for a in filter(None, adapters):
        a = Path(a).resolve()
        if resolved == a or resolved in a.parents:
            raise ConfigError(f"output directory {str(out)!r} is or contains the adapter {str(a)!r}; expected a separate directory "
                              "(the output directory is replaced as a whole)")
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"output directory {str(out)!r} is a file; expected a directory to write the report into")
        if any(out.iterdir()) and not (out / REPORT_NAME).is_file():
            raise ConfigError(f"output directory {str(out)!r} exists and is not an analysis report (no {REPORT_NAME}); "
                              "expected a new or empty directory, or an earlier report to replace")


def _clean(value):
    """JSON-safe: NaN and infinities become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------------- HTML


def _h(v, digits: int = 2) -> str:
    return html.escape(fmt(v, digits))



def _describe(adapter: dict) -> str:
    rows = [("path", adapter.get("path") or "(in memory)"), ("kind", adapter.get("kind")),
            ("layers", adapter.get("num_layers")), ("targets", ", ".join(adapter.get("targets", [])))]
    if adapter.get("kind") == "msplora":
        rows += [("ranks (global, mid, layer)", adapter.get("ranks")), ("alphas", adapter.get("alphas")),
                 ("scales s", [round(s, 6) for s in adapter.get("scales", [])]), ("rsLoRA", adapter.get("use_rslora")),
                 ("mid groups [start, end)", adapter.get("groups"))]
    else:
        rows += [("r", adapter.get("r")), ("lora_alpha", adapter.get("lora_alpha")), ("rsLoRA", adapter.get("use_rslora"))]
    return "<table class='kv'>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                                          for k, v in rows) + "</table>"


LOW_RANK_USE = 0.25
"""Effective rank below this fraction of r is flagged in the HTML table (the level wastes its rank)."""


def _low(erank, rank) -> str:
    if erank is None or not rank or rank < 2 or erank >= LOW_RANK_USE * rank:
        return ""
    return " class='low' title='effective rank below a quarter of the rank: most of it is unused'"


def _summary_table(report: dict) -> str:
    levels = [lv for lv in (*LEVEL_NAMES, "delta")
              if any(lv in s["effective_rank"] for s in report["summary"].values())]
    head = "".join(f"<th>{'total Δ' if lv == 'delta' else lv}<br><small>eff. rank / r</small></th>" for lv in levels)
    has_share = any("sq_norm_share" in s for s in report["summary"].values())
    if has_share:
        head += "".join(f"<th>{lv}<br><small>share</small></th>" for lv in LEVEL_NAMES)
    head += "<th>cross-layer<br><small>mean cosine</small></th>"
    body = []
    for t, s in report["summary"].items():
        cells = "".join(f"<td{_low(s['effective_rank'].get(lv), s['rank'].get(lv))}>{_h(s['effective_rank'].get(lv), 1)} / "
                        f"{_h(s['rank'].get(lv))}</td>" for lv in levels)
        if has_share:
            cells += "".join(f"<td>{_h(s.get('sq_norm_share', {}).get(lv))}</td>" for lv in LEVEL_NAMES)
        cells += f"<td>{_h(s.get('cross_layer_mean_cosine'))}</td>"
        body.append(f"<tr><th>{html.escape(t)}</th>{cells}</tr>")
    return f"<table class='grid'><tr><th>target</th>{head}</tr>{''.join(body)}</table>"


def _compare_table(report: dict) -> str:
    sbs = report["compare"].get("side_by_side", {})
    rows = []
    for t, v in sbs.items():
        er, rk, cl, nm = v["effective_rank_delta"], v["rank_delta"], v["cross_layer_mean_cosine"], v["delta_frobenius_norm"]
        rows.append(f"<tr><th>{html.escape(t)}</th><td>{_h(er['this'], 1)} / {_h(rk['this'])}</td>"
                    f"<td>{_h(er['other'], 1)} / {_h(rk['other'])}</td><td>{_h(cl['this'])}</td><td>{_h(cl['other'])}</td>"
                    f"<td>{_h(nm['this'], 3)}</td><td>{_h(nm['other'], 3)}</td><td>{_h(v.get('mean_delta_cosine'))}</td></tr>")
    return ("<table class='grid'><tr><th>target</th><th>Δ eff. rank / r<br><small>this</small></th>"
            "<th>Δ eff. rank / r<br><small>compare</small></th><th>cross-layer cos<br><small>this</small></th>"
            "<th>cross-layer cos<br><small>compare</small></th><th>mean ‖Δ_l‖_F<br><small>this</small></th>"
            "<th>mean ‖Δ_l‖_F<br><small>compare</small></th><th>cos(Δ this, Δ compare)<br><small>mean over layers</small></th></tr>"
            + "".join(rows) + "</table>")


_CSS = """body{font-family:system-ui,sans-serif;max-width:1500px;margin:1.5em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.2em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
table.kv th{text-align:left;background:#f4f4f4}table.grid tr:first-child th{background:#f4f4f4;text-align:center}
figure{margin:1.5em 0}figure img{max-width:100%;border:1px solid #ddd}figcaption{font-weight:600;margin:.3em 0}
p.read{background:#f7f7ef;border-left:4px solid #cc9;padding:.4em .8em;max-width:1100px}small{color:#666}
td.low{background:#fde2e2}"""


def _index_html(report: dict, figures: list[tuple[str, str, str]]) -> str:
    adapter = report.get("adapter", {})
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>MSPLoRA analysis: {html.escape(str(adapter.get('path')))}"
             f"</title><style>{_CSS}</style></head><body>",
             "<h1>What each scale learned</h1>", _describe(adapter),
             "<h2>Effective ranks and level shares</h2>",
             "<p class='read'>Effective rank (Roy &amp; Vetterli 2007) = exp of the entropy of the normalised singular "
             "values: how many directions an update really uses, against its rank r. Mid and layer: mean over groups / "
             "layers; total Δ: mean over layers. Share: mean over layers of each level's part of Σ‖s·B·A‖²_F. "
             "A level whose effective rank is far below r wastes most of its rank (red: below r/4).</p>",
             _summary_table(report)]
    compare_figs = [f for f in figures if f[0].startswith("compare_")]
    for name, caption, how in (f for f in figures if not f[0].startswith("compare_")):
        parts.append(f"<figure><figcaption>{html.escape(caption)}</figcaption><p class='read'>{html.escape(how)}</p>"
                     f"<img src='{name}' alt='{html.escape(caption)}'></figure>")
    if "compare" in report:
        parts += ["<h2>Compared with</h2>", _describe(report["compare"].get("adapter", {})), _compare_table(report)]
        for name, caption, how in compare_figs:
            parts.append(f"<figure><figcaption>{html.escape(caption)}</figcaption><p class='read'>{html.escape(how)}</p>"
                         f"<img src='{name}' alt='{html.escape(caption)}'></figure>")
    parts.append(f"<p><small>All numbers: <a href='{REPORT_NAME}'>{REPORT_NAME}</a>; fields explained in "
                 "docs/analysis.md.</small></p></body></html>\n")
    return "\n".join(parts)
