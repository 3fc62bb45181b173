"""CPU smoke test of the whole quality pipeline, end to end, on a tiny slice of everything (~2-3 min, 2 cores).

    python -m experiments.quality.smoke          # from the repository root; writes runs/quality-smoke/ (replaced)
    python -m experiments.quality.smoke --smol models/smollm2   # the SmolLM2 study's stages on a real base (~5 min)

The same scripts and code paths as the real test, shrunk: 10 pretraining + 10 task units of at most 120 KB,
a 1024-token vocabulary, the 0.2 M-parameter "smoke" model pretrained on 150 K tokens, six grid cells of 4
steps (lora_qv_r64 and msp_qv_paper: the learning-rate search over 1e-3 and 3e-3 on seed 0, then seed 1 at
the chosen rate) in two worker processes, three cells each, the base and grid bundles packed and
unpacked again (what travels to and from the GPU machine), and report.py writing
runs/quality-smoke/quality.md from docs/quality.md with the plot and the --compare analysis. Numbers from it
mean nothing about MSPLoRA; it only shows that every stage runs and hands the next what it needs.
Timings per stage go to runs/quality-smoke/smoke_timings.json.

With --smol MODEL (a converted SmolLM2 directory, or the .gguf itself; runs/quality-smoke-smol/): the SmolLM2
study's stages on the real 135 M base, shrunk: the docstring task from 6 + 6 small units (rows of at most 256
tokens, the base's tokenizer), the numbers task (48 / 8 / 8 rows), each grid with two arms (lora_qv_r64,
msp_qv_paper) for 2 steps of micro-batch 4, the docstring grid with an lr search (1e-3, 3e-3, seed 0, then seed 1),
the numbers grid at one lr with seeds 1 and 2 (so the seed interval and the verdict rule run), every final cell
generating greedily for its test rows (16 new tokens) and scoring them, the grids bundled and unpacked, and
report.py --study smol writing quality.md and quality_results.json from docs/quality.md with the plots and the
--compare analysis.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from experiments.quality import qlib


def stages(root: Path, threads: int) -> list[tuple[str, list[str]]]:
    r = ["--root", str(root)]
    cells = ["--arms", "lora_qv_r64,msp_qv_paper", "--lrs", "1e-3,3e-3", "--seeds", "1"]
    steps = [
        ("prepare", "prepare.py", [*r, "--max_units", "10", "--max_unit_kb", "120", "--vocab_size", "1024"]),
        ("make_task", "make_task.py", [*r, "--min_doc_chars", "10"]),
        ("pretrain", "pretrain.py", [*r, "--preset", "smoke", "--tokens", "150K", "--batch_size", "8", "--seq_len", "128",
                                     "--warmup_steps", "20", "--eval_every", "100", "--log_every", "50", "--threads", str(threads)]),
        ("grid", "grid.py", [*r, *cells, "--steps", "4", "--micro_batch_size", "4", "--eval_steps", "2", "--jobs", "2"]),
        ("grid_status", "grid.py", [*r, *cells, "--status"]),
        ("pack_base", "bundle.py", ["pack", *r, "--what", "base", "--out", str(root / "out")]),
        ("pack_grid", "bundle.py", ["pack", *r, "--what", "grid", "--out", str(root / "out")]),
        ("unpack", "bundle.py", ["unpack", "--src", str(root / "out"), "--root", str(root / "unpacked")]),
        ("report", "report.py", ["--root", str(root / "unpacked"), "--out", str(root / "quality.md"), "--img_dir", str(root / "img")]),
    ]
    return [(name, [sys.executable, "-m", f"experiments.quality.{script.removesuffix('.py')}", *flags]) for name, script, flags in steps]


def smol_stages(root: Path, model: Path) -> list[tuple[str, list[str]]]:
    doc, num = root / "docstring", root / "numbers"
    tiny = ["--steps", "2", "--micro_batch_size", "4", "--eval_steps", "2", "--max_seq_len", "256", "--gen_max_new_tokens", "16",
            "--gen_batch_size", "8", "--jobs", "2", "--model", str(model), "--arms", "lora_qv_r64,msp_qv_paper"]
    steps = [
        ("prepare", "prepare", ["--root", str(doc), "--max_units", "6", "--max_unit_kb", "60", "--vocab_size", "512"]),
        ("make_task", "make_task", ["--root", str(doc), "--tokenizer", str(model), "--min_doc_chars", "10", "--max_seq_len", "256"]),
        ("numbers", "numbers", ["--root", str(num), "--train", "48", "--dev", "8", "--test", "8"]),
        ("grid_docstring", "grid", ["--root", str(doc), *tiny, "--lrs", "1e-3,3e-3", "--seeds", "1", "--widen", "0"]),
        ("grid_numbers", "grid", ["--root", str(num), *tiny, "--lrs", "1e-3", "--seeds", "1,2"]),
        ("pack_docstring", "bundle", ["pack", "--root", str(doc), "--what", "grid", "--out", str(root / "out" / "docstring")]),
        ("pack_numbers", "bundle", ["pack", "--root", str(num), "--what", "grid", "--out", str(root / "out" / "numbers")]),
        ("unpack_docstring", "bundle", ["unpack", "--src", str(root / "out" / "docstring"), "--root", str(root / "back" / "docstring")]),
        ("unpack_numbers", "bundle", ["unpack", "--src", str(root / "out" / "numbers"), "--root", str(root / "back" / "numbers")]),
        ("report", "report", ["--study", "smol", "--model", str(model), "--tasks",
                              f"docstring={root / 'back' / 'docstring'},numbers={root / 'back' / 'numbers'}",
                              "--out", str(root / "quality.md"), "--img_dir", str(root / "img")]),
    ]
    return [(name, [sys.executable, "-m", f"experiments.quality.{module}", *flags]) for name, module, flags in steps]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=qlib.SMOKE_ROOT)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the pretraining stage (1: robust on a shared machine)")
    p.add_argument("--smol", type=Path, default=None, help="run the SmolLM2 study's stages on this base instead")
    args = p.parse_args(argv)
    if args.smol and args.root == qlib.SMOKE_ROOT:
        args.root = qlib.SMOKE_ROOT.with_name("quality-smoke-smol")
    if args.root.exists():
        shutil.rmtree(args.root)
    args.root.mkdir(parents=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    timings, t_all = {}, time.perf_counter()
    for name, cmd in smol_stages(args.root, args.smol) if args.smol else stages(args.root, args.threads):
        print(f"\n=== {name}: {shlex.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=qlib.REPO, env=env)
        timings[name] = round(time.perf_counter() - t0, 1)
        if proc.returncode != 0:
            raise SystemExit(f"smoke: stage {name} failed with exit code {proc.returncode}")
    timings["total"] = round(time.perf_counter() - t_all, 1)
    qlib.write_json(args.root / "smoke_timings.json", {"seconds": timings, "env": qlib.env_info()})
    print("\nsmoke passed: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    return timings


if __name__ == "__main__":
    main()
