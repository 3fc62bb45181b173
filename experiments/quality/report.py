"""Write the quality test's results into docs/quality.md: whatever they show.

Run on any machine once the grid's results are here (CPU; the --compare analysis takes seconds):

    python -m experiments.quality.report --root runs/quality --out docs/quality.md
    python -m experiments.quality.report --root runs/quality-smoke --out runs/quality-smoke/quality.md --img_dir runs/quality-smoke

The document's prose is hand-written; this script only rewrites the blocks between
`<!-- BEGIN generated:NAME -->` and `<!-- END generated:NAME -->` (status, setup, arms, results), so edits
elsewhere survive. A missing --out starts from --template (docs/quality.md). With no results yet, the
results block says so; nothing is ever filled in by hand.

What it computes, from grid/cells/*/result.json:
- per arm: the test loss of each final seed, mean and sample standard deviation, the learning rate chosen on
  dev, the base model's test loss (step-0 eval) and the share of LoRA's gain over the base that the arm gets;
- per comparison (MSPLoRA arm against its LoRA reference): the mean paired difference over the seeds both
  ran (same seed = same data order), its 95% t-interval, and a verdict: "MSPLoRA lower" or "LoRA lower"
  when the interval excludes 0, else "no difference resolved" (with the interval, so a reader sees how
  small a difference the seeds could have shown);
- a plot of test loss against trainable parameters (log scale), seeds as dots, mean +- sd as error bars;
- launch/analyze.py --adapter <msp_qv_paper> --compare <lora_qv_r64> on the same seed, summarised.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from experiments.quality import grid as gridlib
from experiments.quality import qlib

# (MSPLoRA arm, LoRA arm, what the comparison asks)
COMPARISONS = (
    ("msp_qv_paper", "lora_qv_r64", "the paper's claim: MSPLoRA (64,32,16) vs LoRA r=64 on q,v, fewer parameters"),
    ("msp_qv_paper", "lora_qv_eq_paper", "equal parameters, the paper MSPLoRA's size (q,v)"),
    ("msp_qv_eq_lora64", "lora_qv_r64", "equal parameters, LoRA r=64's size (q,v)"),
    ("msp_all_eq_lora16", "lora_all_r16", "equal parameters, all linear projections, LoRA r=16's size"),
)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
ANALYSIS_PAIR = ("msp_qv_paper", "lora_qv_r64")
PLOT_NAME = "quality_loss_vs_params.png"


# --- loading and statistics -----------------------------------------------------------------------------

def load_results(grid_dir: Path) -> list[dict]:
    cells = grid_dir / "cells"
    return [qlib.read_json(p) for p in sorted(cells.glob("*/result.json"))] if cells.exists() else []


def arms_for(root: Path, grid_meta: dict | None) -> list[dict]:
    """The arms as the grid defined them (grid.json), else computed from base/config.json or the preset."""
    if grid_meta:
        return grid_meta["arms"]
    from msplora_dist.train.backbone import projection_features

    config_path = root / "base" / "config.json"
    config = qlib.read_json(config_path) if config_path.exists() else dict(qlib.MODEL_PRESETS["base"])
    arms = gridlib.define_arms(projection_features(config), config["num_hidden_layers"])
    return [dict(name=a.name, ranks=list(a.ranks), targets=list(a.targets), params=a.params, note=a.note,
                 matched_to=a.matched_to, kind=a.kind) for a in arms]


def finite(x) -> bool:
    return x is not None and isinstance(x, int | float) and math.isfinite(x)


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(results: list[dict], arms: list[dict]) -> dict[str, dict]:
    """Per arm: final test losses by seed, mean, sd, the chosen lr, the lr search, costs."""
    out = {}
    for arm in arms:
        mine = [r for r in results if r["arm"] == arm["name"]]
        finals = [r for r in mine if r["phase"] == "final"]
        ok = {r["seed"]: r for r in finals if r["status"] == "ok" and finite(r.get("final_eval_loss"))}
        losses = [ok[s]["final_eval_loss"] for s in sorted(ok)]
        mean, sd = mean_sd(losses)
        base = [r["base_eval_loss"] for r in ok.values() if finite(r.get("base_eval_loss"))]
        search = {r["lr"]: (r["final_eval_loss"] if r["status"] == "ok" else None) for r in mine if r["phase"] == "lr"}
        out[arm["name"]] = {
            "arm": arm, "by_seed": {s: ok[s]["final_eval_loss"] for s in sorted(ok)}, "mean": mean, "sd": sd, "n": len(losses),
            "lrs": sorted({r["lr"] for r in finals}), "failed": [r["name"] for r in mine if r["status"] != "ok"],
            "base_test_loss": statistics.mean(base) if base else None, "lr_search": dict(sorted(search.items())),
            "wall_s": [r["wall_s"] for r in mine if r["status"] == "ok"],
            "tokens_per_s": [r["tokens_per_s_median"] for r in mine if finite(r.get("tokens_per_s_median"))],
            "steps": sorted({r.get("steps") for r in finals if r.get("steps")}),
        }
    return out


def compare(stats: dict, msp: str, lora: str) -> dict | None:
    """Paired difference (MSPLoRA - LoRA) of test loss over the seeds both arms finished."""
    if msp not in stats or lora not in stats:
        return None
    a, b = stats[msp]["by_seed"], stats[lora]["by_seed"]
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    res = {"msp": msp, "lora": lora, "seeds": seeds, "n": len(diffs)}
    if not diffs:
        res["verdict"] = "not run yet"
        return res
    mean = statistics.mean(diffs)
    res["mean_diff"] = mean
    base = stats[lora]["base_test_loss"]
    if finite(base) and stats[lora]["mean"] is not None and base - stats[lora]["mean"] > 0:
        res["gain_ratio"] = (base - stats[msp]["mean"]) / (base - stats[lora]["mean"]) if stats[msp]["mean"] is not None else None
    if len(diffs) < 2:
        res["verdict"] = "one seed only: no interval"
        return res
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    half = T95.get(len(diffs) - 1, 1.96) * se
    res.update(se=se, ci=(mean - half, mean + half))
    res["verdict"] = "MSPLoRA lower" if mean + half < 0 else "LoRA lower" if mean - half > 0 else "no difference resolved"
    return res


# --- plot and analysis --------------------------------------------------------------------------------------

def plot_loss_vs_params(stats: dict, path: Path) -> Path | None:
    points = [s for s in stats.values() if s["n"]]
    if not points:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = {"LoRA": "#1f77b4", "MSPLoRA": "#d62728"}
    for s in points:
        arm = s["arm"]
        x = arm["params"]
        marker = "o" if len(arm["targets"]) == 2 else "s"
        ax.scatter([x] * s["n"], list(s["by_seed"].values()), color=colors[arm["kind"]], alpha=0.35, s=14, marker=marker)
        ax.errorbar([x], [s["mean"]], yerr=[s["sd"] or 0.0], color=colors[arm["kind"]], marker=marker, ms=7, capsize=4, lw=1.5)
        ax.annotate(arm["name"], (x, s["mean"]), textcoords="offset points", xytext=(6, 4), fontsize=7)
    base = [s["base_test_loss"] for s in points if finite(s["base_test_loss"])]
    if base:
        ax.axhline(statistics.mean(base), color="gray", ls=":", lw=1)
        ax.text(0.01, 0.98, f"base model (no adapter): {statistics.mean(base):.3f}", transform=ax.transAxes, va="top",
                fontsize=7, color="gray")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("test loss (docstring tokens, nats)")
    ax.set_title("Held-out docstring loss vs adapter size (mean +- sd over seeds; dots: seeds)", fontsize=9)
    for kind, c in colors.items():
        ax.scatter([], [], color=c, label=kind)
    ax.scatter([], [], color="k", marker="o", label="q, v")
    ax.scatter([], [], color="k", marker="s", label="all linear")
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def analysis_pair(grid_dir: Path, results: list[dict]) -> tuple[Path, Path, int] | None:
    """Adapters of the paper MSPLoRA and LoRA r=64 final cells of one seed (the smallest both have)."""
    have = {}
    for r in results:
        if r["phase"] == "final" and r["status"] == "ok" and r["arm"] in ANALYSIS_PAIR:
            adapter = gridlib.cell_dir(grid_dir, r["name"]) / "adapter"
            if (adapter / "msplora_config.json").exists():
                have.setdefault(r["seed"], {})[r["arm"]] = adapter
    seeds = sorted(s for s, d in have.items() if len(d) == 2)
    if not seeds:
        return None
    s = seeds[0]
    return have[s][ANALYSIS_PAIR[0]], have[s][ANALYSIS_PAIR[1]], s


def run_analysis(msp: Path, lora: Path, out: Path) -> dict | None:
    cmd = [sys.executable, str(qlib.REPO / "launch" / "analyze.py"), "--adapter", str(msp), "--out", str(out), "--compare", str(lora)]
    proc = subprocess.run(cmd, cwd=qlib.REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"analysis failed ({proc.returncode}): {proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return {"command": " ".join(cmd), "report": qlib.read_json(out / "report.json"), "out": out}


# --- markdown -------------------------------------------------------------------------------------------

def fmt(x, digits: int = 4) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


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


def render_setup(root: Path) -> str:
    parts = []
    corpus = root / "corpus" / "manifest.json"
    if corpus.exists():
        m = qlib.read_json(corpus)
        c = m["counts"]
        parts.append(f"- **Corpus** (prepare.py): the standard library of Python {m.get('stdlib_python') or m['python']} "
                     f"(`{m['stdlib_dir']}`; {m.get('stdlib_source', 'the running interpreter')}), corpus sha256 "
                     f"`{m['corpus_sha256'][:16]}`; pretraining {c['pretrain']['files']} files / {c['pretrain']['units']} units / "
                     f"{c['pretrain']['bytes'] / 1e6:.1f} MB, pretraining validation {c['pretrain_val']['files']} files, held-out task "
                     f"{c['task']['files']} files / {c['task']['units']} units / {c['task']['bytes'] / 1e6:.1f} MB; "
                     f"{len(m['skipped'])} files "
                     f"skipped. Tokenizer: SentencePiece BPE, vocabulary {m['tokenizer']['vocab_size']}, "
                     f"{m['tokenizer']['bytes_per_token_on_samples']} bytes per token. Held-out units: {', '.join(m['task_units'])}.")
    log_path = root / "base" / "pretrain_log.json"
    if log_path.exists():
        p = qlib.read_json(log_path)
        cfg = p["config"]
        mfu = f", MFU {p['mfu_vs_790tflops']:.1%} of 790 TFLOP/s" if p.get("mfu_vs_790tflops") else ""
        parts.append(f"- **Base model** (pretrain.py, preset `{p['preset']}`): LLaMA architecture, hidden {cfg['hidden_size']}, "
                     f"{cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']} heads / "
                     f"{cfg['num_key_value_heads']} key-value heads, "
                     f"MLP {cfg['intermediate_size']}, {p['parameters'] / 1e6:.1f} M parameters; {p['tokens'] / 1e6:.1f} M training tokens "
                     f"({p['epochs']} epochs of {p['pretrain_tokens_per_epoch'] / 1e6:.2f} M) in {p['train_s']:.0f} s on "
                     f"{p['env'].get('gpu') or 'CPU'}, median {p['median_tokens_per_s']:,} tokens/s{mfu}; best validation loss "
                     f"{p['best_val_loss']} at step {p['best_step']} of {p['steps']} (those weights are the base)"
                     + (f"; stopped early: {p['stopped_early']}" if p.get("stopped_early") else "") + ".")
    task_path = root / "task" / "manifest.json"
    if task_path.exists():
        t = qlib.read_json(task_path)
        parts.append(f"- **Task** (make_task.py): {t['functions_with_docstring']} functions with a docstring in the held-out files; kept "
                     + ", ".join(f"{s} {t[s]['rows']} rows from {t[s]['files']} files (mean {t[s]['tokens_mean']:.0f} tokens, "
                                 f"{t[s]['loss_tokens_total']:,} docstring tokens)" for s in ("train", "dev", "test"))
                     + f"; dropped {t['dropped']}.")
    return "\n".join(parts) if parts else "Not built yet: prepare.py, make_task.py and pretrain.py have not run on the GPU machine."


def render_results(root: Path, stats: dict, results: list[dict], grid_meta: dict | None, img_dir: Path, out_md: Path,
                   analysis: dict | None, analysis_seed: int | None, plot: Path | None) -> str:
    if not results:
        return "**Not yet run (needs GPU time).** No grid cell has a result yet: there is no measurement of the claim in this document."
    lines = []
    n_final = sum(1 for r in results if r["phase"] == "final" and r["status"] == "ok")
    planned = len(grid_meta["arms"]) * len(grid_meta["seeds"]) if grid_meta else None
    env = next((r["env"] for r in results if r.get("env")), {})
    lines.append(f"{n_final} of {planned or '?'} reported (final) cells and "
                 f"{sum(1 for r in results if r['phase'] == 'lr')} learning-rate-search cells have results "
                 f"({env.get('gpu') or 'CPU'}, torch {env.get('torch')}, Python {env.get('python')}).")
    failed = [r for r in results if r["status"] != "ok"]
    if failed:
        names = ", ".join(f"`{r['name']}` ({r['status']})" for r in failed)
        lines.append(f"Cells that did not finish normally: {names}.")
    lines.append("\n**Test loss** (mean token cross-entropy of the docstring tokens of task/test.jsonl, nats; lower is better):\n")
    rows = []
    for name, s in stats.items():
        a = s["arm"]
        lr = ", ".join(f"{x:g}" for x in s["lrs"]) or "–"
        per_seed = ", ".join(f"s{k}: {v:.4f}" for k, v in s["by_seed"].items()) or "–"
        rows.append([f"`{name}`", a["kind"], f"{a['params']:,}", lr, f"{fmt(s['mean'])} ± {fmt(s['sd'])} (n={s['n']})", per_seed,
                     fmt(s["base_test_loss"])])
    lines.append(table(["arm", "kind", "trainable params", "lr (chosen on dev)", "test loss mean ± sd", "per seed", "base model"], rows))
    lines.append("\n**Comparisons** (paired by seed: MSPLoRA minus LoRA; negative = MSPLoRA better; 95% t-interval over the seeds; "
                 "gain ratio = MSPLoRA's loss drop from the base model / LoRA's):\n")
    crow = []
    for msp, lora, what in COMPARISONS:
        c = compare(stats, msp, lora)
        if c is None:
            continue
        ci = f"[{c['ci'][0]:+.4f}, {c['ci'][1]:+.4f}]" if "ci" in c else "–"
        crow.append([what, f"`{msp}` vs `{lora}`", f"{stats[msp]['arm']['params'] / stats[lora]['arm']['params']:.2f}x",
                     c["n"], f"{c['mean_diff']:+.4f}" if "mean_diff" in c else "–", ci,
                     f"{c['gain_ratio']:.3f}" if finite(c.get("gain_ratio")) else "–", f"**{c['verdict']}**"])
    lines.append(table(["question", "arms", "params ratio", "seeds", "mean diff", "95% CI", "gain ratio", "verdict"], crow))
    if plot:
        rel = Path(os.path.relpath(plot, out_md.parent)).as_posix()
        lines.append(f"\n![test loss against trainable parameters]({rel})\n")
    search_rows = []
    lrs = sorted({lr for s in stats.values() for lr in s["lr_search"]})
    for name, s in stats.items():
        if s["lr_search"]:
            scored = [(v, k) for k, v in s["lr_search"].items() if finite(v)]
            best = min(scored)[1] if scored else None
            search_rows.append([f"`{name}`"] + [("**" + fmt(s["lr_search"].get(lr)) + "**") if lr == best else fmt(s["lr_search"].get(lr))
                                                 for lr in lrs])
    if search_rows:
        lines.append(f"**Learning-rate search** (dev loss, seed {grid_meta['search_seed'] if grid_meta else '?'}; bold: chosen; "
                     "an edge choice means the grid may not bracket the optimum):\n")
        lines.append(table(["arm"] + [f"lr {lr:g}" for lr in lrs], search_rows))
        edges = [name for name, s in stats.items() if s["lrs"] and lrs and s["lr_search"] and s["lrs"][0] in (lrs[0], lrs[-1])]
        if edges:
            lines.append(f"\nChosen at an edge of the searched range: {', '.join(f'`{e}`' for e in edges)}.")
    cost_rows = [[f"`{n}`", f"{statistics.median(s['wall_s']):.0f}" if s["wall_s"] else "–",
                  f"{statistics.median(s['tokens_per_s']):,.0f}" if s["tokens_per_s"] else "–", ", ".join(map(str, s["steps"])) or "–"]
                 for n, s in stats.items()]
    total = sum(r["wall_s"] for r in results)
    lines.append(f"\n**Cost** (cells ran {results[0].get('concurrent_jobs', 1)} at a time on one device; wall time is a cell's own, "
                 "model loading and engine set-up included (a worker process's first cell also pays the imports and the "
                 f"process group); {total / 60:.1f} cell-minutes in all):\n")
    lines.append(table(["arm", "median wall s per cell", "median tokens/s (trainer)", "steps"], cost_rows))
    if analysis:
        lines.append(render_analysis(analysis, analysis_seed))
        for name, title in (("level_share.png", "MSPLoRA level shares per layer"), ("compare_similarity.png", "MSPLoRA vs LoRA per layer")):
            img = img_dir / f"quality_{name}"
            if img.exists():
                lines.append(f"\n![{title}]({Path(os.path.relpath(img, out_md.parent)).as_posix()})")
    example = next((r for r in results if r["phase"] == "final"), results[0])
    lines.append(f"\nEvery result.json holds its TrainConfig and the trainer command that trains the cell alone; for example "
                 f"`{example['name']}`:\n\n```bash\n"
                 f"{example['command']}\n```")
    return "\n".join(lines)


def render_analysis(analysis: dict, seed: int | None) -> str:
    rep = analysis["report"]
    sbs = rep.get("compare", {}).get("side_by_side", {})
    rows = []
    for t, s in rep["summary"].items():
        er = s["effective_rank"]
        share = s.get("sq_norm_share", {})
        other = sbs.get(t, {})
        erd, clc = other.get("effective_rank_delta", {}), other.get("cross_layer_mean_cosine", {})
        rows.append([t, " / ".join(f"{er.get(lv, 0) or 0:.1f}" for lv in ("global", "mid", "layer")),
                     " / ".join(f"{share.get(lv, 0) or 0:.2f}" for lv in ("global", "mid", "layer")),
                     f"{fmt(erd.get('this'), 1)} / {fmt(erd.get('other'), 1)}", f"{fmt(clc.get('this'), 2)} / {fmt(clc.get('other'), 2)}",
                     fmt(other.get("mean_delta_cosine"), 2)])
    return ("\n**What the adapters learned** (`launch/analyze.py --compare`, seed " + str(seed) + ", MSPLoRA (64,32,16) vs LoRA r=64; "
            f"full report: `{gridlib.repo_relative(analysis['out'])}/index.html`):\n\n"
            + table(["target", "MSPLoRA effective rank G / M / L", "level share of ‖update‖² G / M / L",
                     "effective rank of a layer's update: MSPLoRA / LoRA", "cross-layer cosine: MSPLoRA / LoRA",
                     "cosine MSPLoRA vs LoRA update"], rows))


def render_status(results: list[dict], stats: dict) -> str:
    if not results:
        return "**Status: plan and code ready; results not yet run (needs GPU time).**"
    c = compare(stats, "msp_qv_paper", "lora_qv_r64")
    head = f"**Status: results of {time.strftime('%Y-%m-%d')}.**"
    if c and "mean_diff" in c:
        ci = f", 95% CI [{c['ci'][0]:+.4f}, {c['ci'][1]:+.4f}]" if "ci" in c else ""
        head += (f" The paper's comparison, MSPLoRA (64,32,16) against LoRA r=64 on q,v: test loss difference "
                 f"{c['mean_diff']:+.4f} nats over {c['n']} seed(s){ci}: {c['verdict']}.")
    return head


def replace_block(text: str, name: str, content: str) -> str:
    pattern = re.compile(rf"(<!-- BEGIN generated:{name} -->\n).*?(<!-- END generated:{name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"error: the document has no generated:{name} block")
    return pattern.sub(lambda m: m.group(1) + content.strip("\n") + "\n" + m.group(2), text, count=1)


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=qlib.DEFAULT_ROOT)
    p.add_argument("--out", type=Path, default=qlib.REPO / "docs" / "quality.md")
    p.add_argument("--template", type=Path, default=qlib.REPO / "docs" / "quality.md", help="used when --out does not exist")
    p.add_argument("--img_dir", type=Path, default=qlib.REPO / "docs" / "img", help="where the plot PNGs go")
    p.add_argument("--no_analysis", action="store_true")
    args = p.parse_args(argv)

    grid_dir = args.root / "grid"
    grid_meta = qlib.read_json(grid_dir / "grid.json") if (grid_dir / "grid.json").exists() else None
    arms = arms_for(args.root, grid_meta)
    results = load_results(grid_dir)
    stats = aggregate(results, arms)
    plot = plot_loss_vs_params(stats, args.img_dir / PLOT_NAME) if results else None
    analysis, seed = None, None
    pair = None if args.no_analysis else analysis_pair(grid_dir, results)
    if pair:
        msp, lora, seed = pair
        analysis = run_analysis(msp, lora, args.root / "analysis" / f"{ANALYSIS_PAIR[0]}_vs_{ANALYSIS_PAIR[1]}_s{seed}")
        if analysis:
            for name in ("level_share.png", "compare_similarity.png"):
                if (analysis["out"] / name).exists():
                    shutil.copyfile(analysis["out"] / name, args.img_dir / f"quality_{name}")

    text = (args.out if args.out.exists() else args.template).read_text(encoding="utf-8")
    text = replace_block(text, "status", render_status(results, stats))
    text = replace_block(text, "setup", render_setup(args.root))
    text = replace_block(text, "arms", render_arms(arms))
    body = render_results(args.root, stats, results, grid_meta, args.img_dir, args.out, analysis, seed, plot)
    text = replace_block(text, "results", body)
    qlib.write_text(args.out, text)
    print(f"wrote {args.out} ({len(results)} cell results" + (f", plot {plot}" if plot else "") + (", analysis" if analysis else "") + ")")
    return args.out


if __name__ == "__main__":
    main()
