"""CPU smoke test of the whole quality pipeline, end to end, on a tiny slice of everything (~2-3 min, 2 cores).

    python -m experiments.quality.smoke          # from the repository root; writes runs/quality-smoke/ (replaced)

The same scripts and code paths as the real test, shrunk: 10 pretraining + 10 task units of at most 120 KB,
a 1024-token vocabulary, the 0.2 M-parameter "smoke" model pretrained on 150 K tokens, six grid cells of 4
steps (lora_qv_r64 and msp_qv_paper: the learning-rate search over 1e-3 and 3e-3 on seed 0, then seed 1 at
the chosen rate) in two worker processes, three cells each, the base and grid bundles packed and
unpacked again (what travels to and from the GPU machine), and report.py writing
runs/quality-smoke/quality.md from docs/quality.md with the plot and the --compare analysis. Numbers from it
mean nothing about MSPLoRA; it only shows that every stage runs and hands the next what it needs.
Timings per stage go to runs/quality-smoke/smoke_timings.json.
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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=qlib.SMOKE_ROOT)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the pretraining stage (1: robust on a shared machine)")
    args = p.parse_args(argv)
    if args.root.exists():
        shutil.rmtree(args.root)
    args.root.mkdir(parents=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    timings, t_all = {}, time.perf_counter()
    for name, cmd in stages(args.root, args.threads):
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
