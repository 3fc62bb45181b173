"""Write the quality study's results into docs/quality.md, and every cell as JSON beside it: whatever they show.

Run on any machine once the grids' results are here (CPU; the --compare analysis takes seconds):

    # the SmolLM2 study: one base, one study root per task (each with task/ and grid/)
    python -m experiments.quality.report --study smol --model models/smollm2 \
        --tasks docstring=runs/smol/docstring,numbers=runs/smol/numbers
    # the 22 M stdlib base (issue 8): one root with base/, task/, grid/
    python -m experiments.quality.report --root runs/quality

The document's prose is hand-written; this script only rewrites the blocks between
`<!-- BEGIN generated:NAME -->` and `<!-- END generated:NAME -->`: with --study S the blocks S:status, S:setup,
S:arms and S:results, without it status, setup, arms and results. Edits elsewhere survive, and a study not
named keeps its blocks. A missing --out starts from --template (docs/quality.md). With no results yet, the
results block says so; nothing is ever filled in by hand. --results_json (docs/quality_results.json) gets the
study's key replaced by every cell (arm, seed, lr, params, losses, metric, command) and every comparison.

What it computes, per task, from grid/cells/*/result.json (tables.py, stats.py):
- per arm: the test loss and task metric of each final seed, mean and sample standard deviation, the learning
  rate chosen on dev, the base model's test loss (step-0 eval);
- per comparison (MSPLoRA arm against its LoRA reference), for the loss and for the metric: the mean paired
  difference, its 95% interval over seeds (t) and over test examples (paired bootstrap), and a verdict only
  when both exclude 0 (stats.py says why);
- a plot of test loss and metric against trainable parameters (log scale);
- launch/analyze.py --adapter <msp_qv_paper> --compare <lora_qv_r64> on one seed of the first task: summarised
  here, the whole report (index.html, plots, report.json) copied to docs/quality_analysis/<study>_<task>/.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from experiments.quality import arms as armlib
from experiments.quality import grid as gridlib
from experiments.quality import qlib
from experiments.quality.tables import (
    METRIC_NAMES,
    aggregate,
    fmt,
    plot_vs_params,
    rel_link,
    render_arm_table,
    render_arms,
    render_comparisons,
    render_cost,
    render_lr_search,
    render_reading,
    table,
)

ANALYSIS_PAIR = ("msp_qv_paper", "lora_qv_r64")
PER_EXAMPLE_KEYS = ("scores", "example_loss_sums", "example_loss_tokens")  # kept in runs/, left out of the committed JSON


# --- loading ------------------------------------------------------------------------------------------------

def load_results(grid_dir: Path) -> list[dict]:
    cells = grid_dir / "cells"
    return [qlib.read_json(p) for p in sorted(cells.glob("*/result.json"))] if cells.exists() else []


def arms_for(model: Path | None, grid_meta: dict | None) -> list[dict]:
    """The arms as the grid defined them (grid.json), else computed from the base's config or the 22 M preset."""
    if grid_meta:  # the arms this grid runs (grid.json lists every arm, and which of them ran)
        run = set(grid_meta.get("arms_run") or [a["name"] for a in grid_meta["arms"]])
        return [a for a in grid_meta["arms"] if a["name"] in run]
    from msplora_dist.train.backbone import projection_features

    config = gridlib.base_config(model) if model is not None and Path(model).exists() else dict(qlib.MODEL_PRESETS["base"])
    return [armlib.arm_dict(a) for a in armlib.define_arms(projection_features(config), config["num_hidden_layers"])]


def cell_record(r: dict) -> dict:
    """One cell as the committed JSON holds it: everything but the per-example lists and the log tail."""
    out = {k: v for k, v in r.items() if k not in ("evaluation", "log_tail", "env")}
    if r.get("evaluation"):
        out["evaluation"] = {k: v for k, v in r["evaluation"].items() if k not in PER_EXAMPLE_KEYS}
    return out


# --- the 22 M study's setup, the analysis, the blocks ----------------------------------------------------

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



def render_analysis(analysis: dict, seed: int | None, task: str, link: str) -> str:
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
    return (f"\n\n**What the adapters learned** (`launch/analyze.py --compare`, task `{task}`, seed {seed}, MSPLoRA (64,32,16) vs "
            f"LoRA r=64; the whole report: [{link}]({link})):\n\n"
            + table(["target", "MSPLoRA effective rank G / M / L", "level share of ‖update‖² G / M / L",
                     "effective rank of a layer's update: MSPLoRA / LoRA", "cross-layer cosine: MSPLoRA / LoRA",
                     "cosine MSPLoRA vs LoRA update"], rows))



def replace_block(text: str, name: str, content: str) -> str:
    pattern = re.compile(rf"(<!-- BEGIN generated:{name} -->\n).*?(<!-- END generated:{name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"error: the document has no generated:{name} block")
    return pattern.sub(lambda m: m.group(1) + content.strip("\n") + "\n" + m.group(2), text, count=1)


# --- one task's results -------------------------------------------------------------------------------------

def task_results(name: str, root: Path, model: Path | None, img_dir: Path, out_md: Path, plot_name: str, n_boot: int) -> dict:
    """Everything the document and the JSON say about one task's grid."""
    grid_dir = root / "grid"
    grid_meta = qlib.read_json(grid_dir / "grid.json") if (grid_dir / "grid.json").exists() else None
    arms = arms_for(model, grid_meta)
    results = load_results(grid_dir)
    stats = aggregate(results, arms)
    task = qlib.read_json(root / "task" / "manifest.json") if (root / "task" / "manifest.json").exists() else {}
    recorded = (grid_meta or {}).get("task") or {}
    metric = task.get("metric") or recorded.get("metric") or next((r["metric"] for r in results if r.get("metric")), "chrf")
    lines = []
    if not results:
        lines.append(f"**Not yet run (needs GPU time).** No cell of the `{name}` grid has a result: there is no measurement here.")
        comparisons = []
    else:
        n_final = sum(1 for r in results if r["phase"] == "final" and r["status"] == "ok")
        planned = len(arms) * len(grid_meta["seeds"]) if grid_meta else "?"
        env = next((r["env"] for r in results if r.get("env")), {})
        lines.append(f"{n_final} of {planned} reported (final) cells and {sum(1 for r in results if r['phase'] == 'lr')} "
                     f"learning-rate-search cells have results ({env.get('gpu') or 'CPU'}, torch {env.get('torch')}, "
                     f"Python {env.get('python')}).")
        failed = [r for r in results if r["status"] != "ok"]
        if failed:
            lines.append("Cells that did not finish normally: " + ", ".join(f"`{r['name']}` ({r['status']})" for r in failed) + ".")
        lines.append(f"\n**Test loss and {METRIC_NAMES.get(metric, metric)}** (loss: mean token cross-entropy of the response "
                     "tokens of task/test.jsonl, nats, lower is better; the metric from greedy generations, higher is better):\n")
        lines.append(render_arm_table(stats, metric))
        body, comparisons = render_comparisons(stats, metric, n_boot)
        lines.append("\n**Comparisons** (MSPLoRA minus LoRA; for the loss negative favours MSPLoRA, for the metric positive does; "
                     "95% intervals over the seeds (paired t) and over the test examples (paired bootstrap, the arms' per-example "
                     "values averaged over their seeds); a verdict only where both intervals exclude 0; gain ratio = MSPLoRA's "
                     "loss drop from the base model / LoRA's):\n")
        lines.append(body)
        reading = render_reading(comparisons, metric)
        if reading:
            lines.append("\n" + reading)
        plot = plot_vs_params(stats, img_dir / plot_name, f"{name}: test loss and metric against adapter size", metric)
        if plot:
            lines.append(f"\n![{name}: test loss and metric against trainable parameters]({rel_link(plot, out_md)})\n")
        search = render_lr_search(stats, grid_meta["search_seed"] if grid_meta else "?")
        if search:
            lines.append(search)
        lines.append("\n" + render_cost(stats, results))
        example = next((r for r in results if r["phase"] == "final"), results[0])
        lines.append(f"\nEvery cell's TrainConfig and the trainer command that trains it alone are in the results JSON; for example "
                     f"`{example['name']}`:\n\n```bash\n{example['command']}\n```")
    return {"name": name, "root": root, "grid_meta": grid_meta, "arms": arms, "results": results, "stats": stats, "task": task,
            "metric": metric, "comparisons": comparisons, "markdown": "\n".join(lines)}


def render_status(study: str, tasks: list[dict]) -> str:
    if not any(t["results"] for t in tasks):
        return "**Status: plan and code ready; results not yet run (needs GPU time).**"
    head = f"**Status: results of {time.strftime('%Y-%m-%d')}.**"
    for t in tasks:
        c = next((c for c in t["comparisons"] if (c["msp"], c["lora"]) == ANALYSIS_PAIR), None)
        if c and c["loss"]["mean_diff"] is not None:
            lo, me = c["loss"], c["metric"]
            head += (f" `{t['name']}`, MSPLoRA (64,32,16) against LoRA r=64 on q,v: test loss {lo['mean_diff']:+.4f} nats "
                     f"({lo['verdict']})" + (f", {METRIC_NAMES.get(t['metric'], t['metric'])} {me['mean_diff']:+.3f} ({me['verdict']})"
                                              if me["mean_diff"] is not None else "") + ".")
    return head


def render_study_setup(model: Path | None, tasks: list[dict]) -> str:
    parts = []
    base = next((t["grid_meta"]["base"] for t in tasks if t["grid_meta"]), None)
    if base is None and model is not None and Path(model).exists():
        base = gridlib.base_record(Path(model))
    if base:
        src = base.get("gguf_source", {})
        origin = (f", converted from `{src.get('gguf_file')}` (sha256 `{src.get('sha256', '')[:16]}...`, "
                  f"{src.get('parameters', 0) / 1e6:.1f} M parameters, {src.get('dtype')})") if src else ""
        parts.append(f"- **Base**: `{base['path']}`{origin}.")
    for t in tasks:
        m = t["task"]
        if not m:
            parts.append(f"- **Task `{t['name']}`**: not built yet.")
        elif m.get("task") == "numbers":
            parts.append(f"- **Task `{t['name']}`** (numbers.py, seed {m['seed']}, up to {m['max_digits']} digits, exact match): "
                         + ", ".join(f"{s} {m[s]['rows']} rows ({m[s]['to_words']} to words)" for s in ("train", "dev", "test")) + ".")
        else:
            parts.append(f"- **Task `{t['name']}`** (make_task.py, chrF): {m['functions_with_docstring']} functions with a docstring in "
                         "the held-out files; kept " + ", ".join(f"{s} {m[s]['rows']} rows from {m[s]['files']} files (mean "
                                                                  f"{m[s]['tokens_mean']:.0f} tokens)" for s in ("train", "dev", "test"))
                         + f"; dropped {m['dropped']}.")
    return "\n".join(parts) if parts else "Not built yet."


def block_name(study: str, name: str) -> str:
    return f"{study}:{name}" if study else name


def write_results_json(path: Path, study: str, model: Path | None, tasks: list[dict]) -> None:
    data = qlib.read_json(path) if path.exists() else {}
    data.setdefault("studies", {})[study or "stdlib22m"] = {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": str(model) if model else None,
        "tasks": {t["name"]: {"root": gridlib.repo_relative(t["root"]), "metric": t["metric"], "grid": t["grid_meta"],
                              "task_manifest": {k: v for k, v in t["task"].items() if k != "functions"},
                              "comparisons": t["comparisons"], "cells": [cell_record(r) for r in t["results"]]}
                  for t in tasks}}
    qlib.write_json(path, data)


def parse_tasks(text: str) -> list[tuple[str, Path]]:
    out = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"error: --tasks item {item!r}: expected NAME=STUDY_ROOT")
        out.append((name, Path(path)))
    return out


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", default="", help="the study's name, the prefix of its blocks (default: the 22 M study's plain blocks)")
    p.add_argument("--root", type=Path, default=None, help="without --tasks: one study root with base/, task/, grid/")
    p.add_argument("--tasks", default=None, help="NAME=ROOT,NAME=ROOT: one study root (task/, grid/) per task")
    p.add_argument("--model", type=Path, default=None, help="the base (default: ROOT/base)")
    p.add_argument("--out", type=Path, default=qlib.REPO / "docs" / "quality.md")
    p.add_argument("--template", type=Path, default=qlib.REPO / "docs" / "quality.md", help="used when --out does not exist")
    p.add_argument("--img_dir", type=Path, default=qlib.REPO / "docs" / "img", help="where the plot PNGs go")
    p.add_argument("--results_json", type=Path, default=None, help="default: beside --out, quality_results.json")
    p.add_argument("--analysis_dir", type=Path, default=None, help="default: beside --out, quality_analysis/")
    p.add_argument("--n_boot", type=int, default=10000)
    p.add_argument("--no_analysis", action="store_true")
    args = p.parse_args(argv)
    if args.tasks:
        task_roots = parse_tasks(args.tasks)
    else:
        root = args.root or qlib.DEFAULT_ROOT
        task_roots = [("docstring", root)]
        args.model = args.model or root / "base"
    prefix = f"quality_{args.study}_" if args.study else "quality_"
    tasks = [task_results(name, root, args.model, args.img_dir, args.out, f"{prefix}{name}_vs_params.png", args.n_boot)
             for name, root in task_roots]

    analysis_md = ""
    first = tasks[0]
    pair = None if args.no_analysis else analysis_pair(first["root"] / "grid", first["results"])
    if pair:
        msp, lora, seed = pair
        out = first["root"] / "analysis" / f"{ANALYSIS_PAIR[0]}_vs_{ANALYSIS_PAIR[1]}_s{seed}"
        analysis = run_analysis(msp, lora, out)
        if analysis:
            dest = (args.analysis_dir or args.out.parent / "quality_analysis") / f"{args.study or 'stdlib22m'}_{first['name']}"
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(out, dest)
            analysis_md = render_analysis(analysis, seed, first["name"], rel_link(dest / "index.html", args.out))

    text = (args.out if args.out.exists() else args.template).read_text(encoding="utf-8")
    text = replace_block(text, block_name(args.study, "status"), render_status(args.study, tasks))
    setup = render_setup(task_roots[0][1]) if not args.study else render_study_setup(args.model, tasks)
    text = replace_block(text, block_name(args.study, "setup"), setup)
    text = replace_block(text, block_name(args.study, "arms"), render_arms(first["arms"]))
    body = "\n\n".join((f"#### Task `{t['name']}`\n\n" if args.tasks else "") + t["markdown"] for t in tasks) + analysis_md
    if args.study and not any(t["results"] for t in tasks):
        body += (f"\n\nThe analysis report of `{ANALYSIS_PAIR[0]}` against `{ANALYSIS_PAIR[1]}` (what each scale learned) is linked "
                 f"here, from `quality_analysis/{args.study}_{first['name']}/index.html`, once the grid has run.")
    text = replace_block(text, block_name(args.study, "results"), body)
    qlib.write_text(args.out, text)
    json_path = args.results_json or args.out.parent / "quality_results.json"
    if any(t["results"] for t in tasks):
        write_results_json(json_path, args.study, args.model, tasks)
    n = sum(len(t["results"]) for t in tasks)
    print(f"wrote {args.out} ({n} cell results" + (f", {json_path}" if n else "") + (", analysis" if analysis_md else "") + ")")
    return args.out


if __name__ == "__main__":
    main()
