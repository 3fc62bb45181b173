"""The benchmark's command line: `python -m tools.bench --mode ...` (see tools/bench/__init__.py)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

import tools.bench
from msplora_dist.errors import ConfigError, UserError
from tools.bench.models import SHAPES
from tools.bench.trainer_rows import TRAINER_VARIANTS

MODES = ("speed", "layer", "check", "make-model", "make-data", "compare", "scaling-report", "trainer-row")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=tools.bench.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="speed", choices=MODES,
                        help="trainer-row: one ds-* row in this process (what --mode speed runs in a child)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU, every variant, seconds")
    parser.add_argument("--device", default=None, help="cuda (default when available), cuda:1, cpu")
    parser.add_argument("--shapes", default="7b,1b", help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--variants", default=None, help="comma list (default: all that apply to each shape)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "msplora_bench"),
                        help="the trainer rows' model directories and data (built once per shape) and run outputs")
    parser.add_argument("--tokens", default="512,2048,8192", help="--mode layer: token counts")
    parser.add_argument("--layer-warmup", type=int, default=5)
    parser.add_argument("--layer-iters", type=int, default=30)
    parser.add_argument("--out", default=None, help="JSON results (rewritten after every variant)")
    parser.add_argument("--shape", default="7b", help="--mode make-model and trainer-row")
    parser.add_argument("--save-dir", default=None, help="--mode make-model/make-data: where to write")
    parser.add_argument("--rows", type=int, default=128, help="--mode make-data")
    parser.add_argument("--min_tokens", type=int, default=2100, help="--mode make-data")
    parser.add_argument("--runs", nargs="+", default=[], help="--mode compare/scaling-report: output dirs")
    parser.add_argument("--skip", type=int, default=3, help="--mode scaling-report: first steps left out")
    return parser


def check_args(args) -> None:
    """The flags a mode needs, with one-line errors before any work."""
    if args.mode in ("make-model", "trainer-row") and args.shape not in SHAPES:
        raise ConfigError(f"--shape {args.shape!r}: expected one of {', '.join(SHAPES)}")
    if args.mode in ("make-model", "make-data") and not args.save_dir:
        raise ConfigError(f"--mode {args.mode} needs --save-dir: expected the path to write")
    if args.mode == "compare" and len(args.runs) != 2:
        raise ConfigError(f"--mode compare: --runs has {len(args.runs)} directories; expected two")
    if args.mode == "scaling-report" and not args.runs:
        raise ConfigError("--mode scaling-report: expected --runs with one or more training output directories")
    if args.mode == "trainer-row" and args.variants not in TRAINER_VARIANTS:
        raise ConfigError(f"--mode trainer-row: --variants {args.variants!r}; expected one of {', '.join(TRAINER_VARIANTS)}")
    if args.warmup < 0 or args.iters < 1:
        raise ConfigError(f"--warmup {args.warmup} --iters {args.iters}: expected warmup >= 0 and iters >= 1")


def run(args) -> int:
    if args.mode == "speed":
        from tools.bench.speed import speed

        rows = speed(args)
        return 1 if any("error" in r for r in rows) else 0
    if args.mode == "trainer-row":
        from tools.bench.trainer_rows import trainer_row_main

        return trainer_row_main(args)
    if args.mode == "layer":
        from tools.bench.layer import layer_bench

        layer_bench(args)
    elif args.mode == "check":
        from tools.bench.layer import check_layer

        rows = check_layer(args)
        return 0 if all(r["finite"] and max(r["now"].values()) < 2e-2 for r in rows) else 1
    elif args.mode == "make-model":
        from tools.bench.scaling import write_model_dir

        write_model_dir(args.shape, torch.device(args.device), Path(args.save_dir))
    elif args.mode == "make-data":
        from tools.bench.scaling import write_text_rows

        write_text_rows(Path(args.save_dir), args.rows, args.min_tokens)
    else:
        from tools.bench.scaling import compare_runs, scaling_report

        result = compare_runs(args) if args.mode == "compare" else scaling_report(args)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.cpu_smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        args.device = args.device or "cpu"
        args.shapes, args.warmup, args.iters = "smoke", 1, 1
        args.layer_warmup, args.layer_iters = 1, 1
        torch.set_num_threads(min(2, torch.get_num_threads()))
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        check_args(args)
        return run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
