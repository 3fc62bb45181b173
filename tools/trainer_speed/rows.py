"""The trainer rows (`launch/train.py` itself, one process each) and the batches that every row and anchor trains on."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from msplora_dist.errors import ConfigError
from tools.bench.models import ALL_TARGETS
from tools.bench.trainer_rows import DIST_ENV
from tools.trainer_speed.anchors import failed, step_summary

REPO = Path(__file__).resolve().parents[2]
LR = "1e-4"


@dataclass(frozen=True)
class Row:
    ds_config: str  # zero2 or zero3: ds_configs/<it>.json
    liger: bool
    flags: tuple[str, ...] = ()
    budget_gb: float | None = None  # --activation_memory_gb: the peak the row must stay within


REST_OF_PEAK_GB = 7  # see the memory-budget rows
ROWS = {
    # On one GPU a zero3 row runs stage 2 (--single_rank_zero3 as_zero2, the default); -keep rows run stage 3 there.
    "zero3-plain": Row("zero3", False, ("--zero3_leaf_layers", "false", "--single_rank_zero3", "keep")),  # before issue 14
    "zero3": Row("zero3", False),
    "zero3-liger": Row("zero3", True),
    "zero3-liger-keep": Row("zero3", True, ("--single_rank_zero3", "keep")),
    "zero2": Row("zero2", False),
    "zero2-liger": Row("zero2", True),
    # The memory-budget mode on a GPU of 24 or 40 GB: the target is the whole peak within it, and the flag gives the
    # activations, so it gets the card less what the rest holds at the 7B shape (backbone, adapters, Adam, buffers:
    # 3.9 GB allocated before the probe) and the backward's transients, which the estimate leaves out: measured 3.0 GB
    # over the estimate on the H200 (docs/benchmarks.md), so 7 GB leaves 0.1 GB; the row's "budget" column checks it.
    **{f"zero{stage}-liger-mem{gb}": Row(f"zero{stage}", True, ("--activation_memory_gb", str(gb - REST_OF_PEAK_GB)), float(gb))
       for stage in (3, 2) for gb in (24, 40)},
    # Regional torch.compile of the decoder layers (--compile_layers; with Liger only its fused cross-entropy stays)
    "zero2-compile": Row("zero2", False, ("--compile_layers", "true")),
    "zero2-liger-compile": Row("zero2", True, ("--compile_layers", "true")),
    "zero3-liger-compile": Row("zero3", True, ("--compile_layers", "true")),
    **{f"zero3-liger-compile-mem{gb}": Row("zero3", True, ("--compile_layers", "true", "--activation_memory_gb",
                                                           str(gb - REST_OF_PEAK_GB)), float(gb)) for gb in (24, 40)},
}


@dataclass(frozen=True)
class Settings:
    """What every row and anchor of one run shares."""

    model: str
    data: str
    batch: int
    seq: int
    steps: int
    warmup: int
    load_in_4bit: bool
    gradient_checkpointing: bool
    ranks: tuple[int, int, int]
    workdir: Path


def resolve_ranks(value: str, model: str) -> tuple[int, int, int]:
    """--ranks: three integers, or the name of a quality-study arm on all seven projections (experiments/quality/
    arms.py), whose ranks are matched on this model's shape (msp_all_eq_lora16: LoRA r=16's parameter count)."""
    if re.fullmatch(r"\d+,\d+,\d+", value):
        return tuple(int(r) for r in value.split(","))
    from experiments.quality.arms import define_arms
    from msplora_dist.train.backbone import check_model_dir, projection_features

    hf_config = check_model_dir(model)
    arms = {a.name: a for a in define_arms(projection_features(hf_config), hf_config["num_hidden_layers"])
            if a.targets == ALL_TARGETS}
    if value not in arms:
        raise ConfigError(f"--ranks {value!r}: expected three integers a,b,c or an arm on all seven projections "
                          f"({', '.join(arms)})")
    return arms[value].ranks


def trainer_flags(s: Settings, ds_config: str, output_dir: Path) -> list[str]:
    """launch/train.py's flags shared by every row: the backbone, the adapter and the data; the row adds its own."""
    true_false = {True: "true", False: "false"}
    return ["--ds_config", str(REPO / "ds_configs" / f"{ds_config}.json"), "--model", s.model, "--data", s.data,
            "--output_dir", str(output_dir), "--overwrite", "true", "--load_in_4bit", true_false[s.load_in_4bit],
            "--gradient_checkpointing", true_false[s.gradient_checkpointing], "--ranks", ",".join(map(str, s.ranks)),
            "--alphas", "16", "--num_mid_groups", "3", "--target_modules", ",".join(ALL_TARGETS), "--dropout", "0",
            "--micro_batch_size", str(s.batch), "--grad_accum", "1", "--max_seq_len", str(s.seq), "--packing", "true",
            "--max_steps", str(s.steps), "--eval_fraction", "0", "--eval_steps", "0", "--save_steps", "0",
            "--analyze", "false", "--lr", LR]


def write_inputs(s: Settings, path: Path) -> dict:
    """The batches of the trainer's steps 1..steps as Trainer.step draws them (the trainer's own preflight: the data
    tokenized and packed, its sampler on one rank, grad_accum 1), with what the anchors need to load the same
    backbone, written to `path`; returns what the table reports about the rows (trainable parameters, dtype)."""
    import torch

    from experiments.quality.arms import trainable_params
    from msplora_dist.train.backbone import check_model_dir, projection_features
    from msplora_dist.train.flags import parse_config
    from msplora_dist.train.preflight import preflight

    cfg = parse_config([*trainer_flags(s, "zero2", s.workdir / "inputs"), "--liger", "false"])  # no row flag moves data
    plan = preflight(cfg, 1, torch.cuda.is_available())
    steps = [[plan.train_ds[i] for i in plan.sampler.micro_batch_indices(step, 0, 0, 1, s.batch)]
             for step in range(s.steps)]  # every column, so that reading a row costs the anchor what it costs the trainer
    hf_config = check_model_dir(plan.model_dir)
    msplora = trainable_params(s.ranks, ALL_TARGETS, projection_features(hf_config), hf_config["num_hidden_layers"], 3)
    spec = {"model": str(plan.model_dir), "model_type": plan.model_type, "dtype": plan.dtype,
            "load_in_4bit": s.load_in_4bit, "gradient_checkpointing": s.gradient_checkpointing,
            "attn_implementation": cfg.attn_implementation, "seq": s.seq, "warmup": s.warmup, "lr": float(LR),
            "targets": list(ALL_TARGETS), "pad_id": plan.tokenizer.pad_token_id, "steps": steps,
            # The trainer's count of a step's tokens (Trainer.step: the rows' lengths, padding left out).
            "tokens": [sum(len(e["input_ids"]) for e in examples) for examples in steps]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec))
    return {"msplora_trainable": msplora, "dtype": plan.dtype, "tokens_per_step": spec["tokens"]}


def trainer_row(name: str, s: Settings, on_gpu: bool, trainable: int) -> dict:
    """One row: launch/train.py in a process of its own; its figures from the summary.json it wrote."""
    row = ROWS[name]
    if (row.liger or "--compile_layers" in row.flags) and not on_gpu:
        return {"row": name, "skipped": "needs CUDA"}
    out_dir = s.workdir / name
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), *trainer_flags(s, row.ds_config, out_dir),
           "--liger", "true" if row.liger else "false", "--compile_layers", "false", *row.flags]  # a row's own flag wins
    t0 = time.time()
    # A world of one of its own: not the launcher variables of a parent that holds a process group (or its port)
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return failed(name, proc)
    summary = json.loads((out_dir / "summary.json").read_text())
    steps = [h for h in summary["history"] if "tokens_per_s" in h]
    result = {"row": name, **step_summary([h["tokens_per_s"] for h in steps], s.warmup),
              "losses": [round(h["loss"], 4) for h in steps[:4]], "tokens_per_step": [h["tokens"] for h in steps],
              "peak_gb": summary["peak_mem_gb_max"], "trainable": trainable, "wall_s": time.time() - t0,
              "startup_s": summary["startup_s"], "speed_features": summary.get("speed_features")}
    if row.budget_gb is not None:
        result["budget_gb"] = row.budget_gb
    return result
