"""The command line: `python -m tools.trainer_speed ...` (see tools/trainer_speed/__init__.py)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import tools.trainer_speed
from msplora_dist.errors import ConfigError, UserError
from tools.trainer_speed.anchors import ANCHORS, run_anchor
from tools.trainer_speed.report import table_lines
from tools.trainer_speed.rows import REPO, ROWS, Settings, resolve_ranks, trainer_row, write_inputs

SMOKE = dict(model=str(REPO / "msplora_dist" / "assets" / "tiny_llama"), batch=2, seq=32, steps=3, warmup=1,
             ranks="msp_all_eq_lora16")


DEFAULT_ROWS, DEFAULT_ANCHORS = "zero3-liger-compile,zero3-liger", "unsloth,peft-tuned"  # the main command, and eager


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.trainer_speed", description=tools.trainer_speed.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a model directory (python -m tools.bench --mode make-model, or a converted one)")
    p.add_argument("--data", help="a jsonl of rows longer than --seq tokens (python -m tools.bench --mode make-data)")
    p.add_argument("--out", help="JSON results; an existing file is extended (rewritten after every row)")
    p.add_argument("--rows", help=f"comma list of {', '.join(ROWS)}, or empty (default: {DEFAULT_ROWS}; --smoke: all)")
    p.add_argument("--anchors", help=f"comma list of {', '.join(ANCHORS)}, or empty (default: {DEFAULT_ANCHORS}; "
                   "--smoke: all)")
    p.add_argument("--batch", type=int, default=4, help="rows per step (the trainer's micro-batch; grad_accum 1)")
    p.add_argument("--seq", type=int, default=2048, help="tokens per row (packed)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    p.add_argument("--repeat", type=int, default=1, help="rounds of all rows and anchors, interleaved")
    p.add_argument("--load_in_4bit", default="true", help="true: NF4 backbone for every row and anchor; false: the "
                   "model's weights in the trainer's dtype (a small bf16/fp32 model)")
    p.add_argument("--gradient_checkpointing", default="true", help="the rows' and torch-peft's checkpointing")
    p.add_argument("--ranks", default="48,16,13", help="the rows' MSPLoRA ranks: a,b,c or a quality-study arm on all "
                   "seven projections (msp_all_eq_lora16: LoRA r=16's parameter count on this model)")
    p.add_argument("--workdir", default="runs/trainer_speed", help="the rows' and anchors' output directories")
    p.add_argument("--smoke", action="store_true", help="CPU-sized run on the shipped tiny model and generated data "
                   "(rows and anchors that need CUDA are listed as skipped)")
    p.add_argument("--report", nargs="+", metavar="JSON", help="print the table of these results files and exit")
    return p


def names(value: str, known, flag: str) -> list[str]:
    chosen = [n for n in value.split(",") if n]
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise ConfigError(f"{flag} {unknown[0]!r}: expected a comma list of {', '.join(known)}")
    return chosen


def boolean(value: str, flag: str) -> bool:
    if value not in ("true", "false"):
        raise ConfigError(f"{flag} {value!r}: expected true or false")
    return value == "true"


def settings(args) -> Settings:
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        args.data = args.data or str(Path(args.workdir) / "smoke.jsonl")
        if not Path(args.data).is_file():
            from tools.bench.scaling import write_text_rows

            Path(args.data).parent.mkdir(parents=True, exist_ok=True)
            write_text_rows(Path(args.data), 4 * args.batch * args.steps, args.seq + 16)
    if not args.model or not args.data or not args.out:
        raise ConfigError("expected --model, --data and --out (or --smoke with --out, or --report)")
    if args.batch < 1 or args.seq < 2 or args.steps <= args.warmup or args.warmup < 0 or args.repeat < 1:
        raise ConfigError(f"--batch {args.batch} --seq {args.seq} --steps {args.steps} --warmup {args.warmup} --repeat "
                          f"{args.repeat}: expected batch >= 1, seq >= 2, steps > warmup >= 0, repeat >= 1")
    model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model  # rows and anchors run elsewhere
    return Settings(model=model, data=str(Path(args.data).resolve()), batch=args.batch, seq=args.seq, steps=args.steps,
                    warmup=args.warmup, load_in_4bit=boolean(args.load_in_4bit, "--load_in_4bit"),
                    gradient_checkpointing=boolean(args.gradient_checkpointing, "--gradient_checkpointing"),
                    ranks=resolve_ranks(args.ranks, model), workdir=Path(args.workdir).resolve())


def run(args) -> list[dict]:
    everything = (",".join(ROWS), ",".join(ANCHORS)) if args.smoke else (DEFAULT_ROWS, DEFAULT_ANCHORS)
    rows = names(everything[0] if args.rows is None else args.rows, ROWS, "--rows")
    anchors = names(everything[1] if args.anchors is None else args.anchors, ANCHORS, "--anchors")
    s = settings(args)
    on_gpu = torch.cuda.is_available()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else []
    inputs = s.workdir / "inputs.json"
    info = write_inputs(s, inputs)
    session = time.strftime("%Y-%m-%dT%H:%M:%S")
    print(f"run {session}: {s.batch} x {s.seq} tokens a step, {s.steps} steps (median of the last {s.steps - s.warmup}), "
          f"{info['dtype']}, 4-bit {s.load_in_4bit}, checkpointing {s.gradient_checkpointing}, MSPLoRA {s.ranks}",
          flush=True)
    # --repeat R interleaves R rounds of every row and anchor: a ratio is taken between neighbours in time (the
    # same round), and the spread of the rounds shows the machine's noise.
    for round_ in range(args.repeat):
        jobs = [lambda n=n: trainer_row(n, s, on_gpu, info["msplora_trainable"]) for n in rows]
        jobs += [lambda n=n: run_anchor(n, inputs, s.workdir, on_gpu) for n in anchors]
        for job in jobs:
            results.append({**job(), "session": session, "round": round_})
            print(json.dumps(results[-1])[:700], flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1))  # after every row: a call cut short keeps what ran
    return results


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.report:
            results = [r for f in args.report for r in json.loads(Path(f).read_text())]
        else:
            if args.smoke and not torch.cuda.is_available():
                os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the rows' DeepSpeed on a machine without CUDA
            results = run(args)
    except UserError as err:  # ConfigError and the trainer's preflight errors (bad data, model)
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(table_lines(results)))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
