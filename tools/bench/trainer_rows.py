"""The benchmark's trainer rows (ds-zero2, ds-zero3, ds-zero1, ds-zero2-nooverlap): msplora_dist.train.trainer.Trainer
itself, so what they report is what `launch/train.py` runs.

Each row is one child process, `python -m tools.bench --mode trainer-row ...` (a ZeRO-3 engine left in a process
changes the memory of models built after it, so no two DeepSpeed engines share one). The child writes the shape's
random-weight model to a Hugging Face directory and long text rows to a jsonl file, both cached under --workdir so
a shape is built once, then builds a TrainConfig of the matched-rank msplora variant (4-bit backbone, gradient
checkpointing, packing: every row is seq tokens), calls Trainer(cfg), setup(), step() warmup + iters times, each
CUDA-synchronised and timed, and close(); the row holds those times next to the Trainer's own records.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from msplora_dist.utils.fileio import write_dir_atomically, write_file_atomically
from tools.bench.models import ALL_TARGETS, MATCHED_RANKS, SHAPES, free_memory, log, param_count
from tools.bench.scaling import REPO, write_model_dir, write_text_rows

# variant: (shipped DeepSpeed config, what is changed in its zero_optimization, note)
TRAINER_VARIANTS = {
    "ds-zero2": ("zero2.json", {}, ""),
    "ds-zero3": ("zero3.json", {}, ""),
    "ds-zero1": ("zero2.json", {"stage": 1}, ", stage 1"),
    "ds-zero2-nooverlap": ("zero2.json", {"overlap_comm": False}, ", overlap_comm false"),
}
# The launcher's variables of a parent started under deepspeed/torchrun: the child is a world of one of its own.
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# --- inputs, cached under the workdir ----------------------------------------------------------------------------


def cached_model_dir(shape_name: str, device: torch.device, workdir: Path) -> Path:
    """{workdir}/models/{shape}: written once per shape (the shape is stamped in it, so an edited shape rebuilds)."""
    target = workdir / "models" / shape_name
    stamp = json.dumps(SHAPES[shape_name], sort_keys=True)
    if (target / "bench_shape.json").is_file() and (target / "bench_shape.json").read_text() == stamp:
        return target

    def write(tmp: Path) -> None:
        write_model_dir(shape_name, device, tmp)
        (tmp / "bench_shape.json").write_text(stamp)

    write_dir_atomically(target, write)
    free_memory(device)  # the model that was saved; nothing of it may count in the row's memory
    return target


def cached_data(shape_name: str, rows: int, workdir: Path) -> Path:
    """{workdir}/data/...: `rows` text rows, each longer than the shape's sequence (packing then makes every
    training row exactly seq tokens)."""
    min_tokens = SHAPES[shape_name]["seq"] + 16
    path = workdir / "data" / f"text-{rows}x{min_tokens}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_rows(path, rows, min_tokens)
    return path


def ds_config_file(variant: str, workdir: Path) -> Path:
    """The shipped config of the variant, or a copy of it with the variant's change written under the workdir."""
    name, change, _ = TRAINER_VARIANTS[variant]
    shipped = REPO / "ds_configs" / name
    if not change:
        return shipped
    raw = json.loads(shipped.read_text())
    raw["zero_optimization"].update(change)
    path = workdir / "ds_configs" / f"{variant}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(path, json.dumps(raw, indent=2))
    return path


def train_config(shape_name: str, variant: str, steps: int, model_dir: Path, data: Path, workdir: Path):
    """The `msplora` variant as a training run: matched ranks (the trainable parameters of PEFT r=16 on all seven
    targets), dropout 0, 4-bit backbone, checkpointing; no evaluation, analysis or checkpoint."""
    from msplora_dist.train.config import TrainConfig

    shape = SHAPES[shape_name]
    return TrainConfig(model=str(model_dir), data=str(data), eval_fraction=0.0, eval_steps=0, analyze=False, save_steps=0,
                       output_dir=str(workdir / "runs" / f"{shape_name}-{variant}"), overwrite=True,
                       ds_config=str(ds_config_file(variant, workdir)), max_steps=steps, lr=1e-5,
                       micro_batch_size=shape["batch"], grad_accum=1, max_seq_len=shape["seq"], packing=True,
                       load_in_4bit=True, gradient_checkpointing=True, attn_implementation="sdpa",
                       ranks=MATCHED_RANKS[shape_name], alphas=(16.0,) * 3, num_mid_groups=3, target_modules=ALL_TARGETS,
                       dropout=(0.0,) * 3, compile_layers="false",
                       single_rank_zero3="keep")  # what the ds-* rows measured: eager layers, a ZeRO-3 row at stage 3


# --- the child: one row ------------------------------------------------------------------------------------------


def run_row(shape_name: str, variant: str, device: torch.device, warmup: int, iters: int, workdir: Path) -> dict:
    """Trainer(cfg), setup(), warmup + iters timed step()s, close(); the row of the speed table."""
    from msplora_dist.adapters.inject import param_report
    from msplora_dist.train.trainer import Trainer, peak_memory_gb

    shape = SHAPES[shape_name]
    steps = warmup + iters
    model_dir = cached_model_dir(shape_name, device, workdir)
    cfg = train_config(shape_name, variant, steps, model_dir, cached_data(shape_name, shape["batch"] * steps, workdir),
                       workdir)
    on_gpu = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if on_gpu else (lambda: None)
    leftover = torch.cuda.memory_allocated(device) if on_gpu else 0
    t_build = time.perf_counter()
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        build_s = time.perf_counter() - t_build
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(device)
        times, records = [], []
        for i in range(steps):
            sync()
            t0 = time.perf_counter()
            record = trainer.step()
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
                records.append(record)
        tokens = {r["tokens"] for r in records}
        if tokens != {shape["batch"] * shape["seq"]}:
            raise RuntimeError(f"steps of {sorted(tokens)} tokens; expected {shape['batch']} x {shape['seq']} (packed rows "
                               "shorter than seq: the data rows are too short)")
        # The Trainer's own peak (train() records the same): CUDA's allocator peak since the reset above, or the
        # process's peak resident memory on a CPU.
        peak = peak_memory_gb(trainer.device) - leftover / 2**30
        trainable = param_report(trainer.engine.module).total
        stage, dtype = trainer.plan.zero_stage, trainer.plan.dtype
    finally:
        trainer.close()
    step_s = statistics.median(times)
    name, _, note = TRAINER_VARIANTS[variant]
    return {"shape": shape_name, "variant": variant, "tokens_per_step": shape["batch"] * shape["seq"],
            "step_s_median": step_s, "step_s_all": times, "tokens_per_s": shape["batch"] * shape["seq"] / step_s,
            "trainer_tokens_per_s": [r["tokens_per_s"] for r in records], "loss": [r["loss"] for r in records],
            "peak_mem_gb": peak, "build_s": build_s, "base_params": param_count(shape), "leftover_gb_before": leftover / 2**30,
            "trainable": trainable, "checkpointing": True, "zero_stage": stage, "dtype": dtype,
            "note": f"Trainer, ranks={MATCHED_RANKS[shape_name]} ds_configs/{name}{note}, {dtype}"}


def trainer_row_main(args) -> int:
    """--mode trainer-row: one row, written to --out as JSON (an error row too, so the parent can show it)."""
    from msplora_dist.dist.process import shutdown_distributed

    variant = args.variants
    try:
        row = run_row(args.shape, variant, torch.device(args.device), args.warmup, args.iters, Path(args.workdir))
    except Exception as err:  # the parent reports it in the table and goes on with the other variants
        traceback.print_exc()
        row = {"shape": args.shape, "variant": variant, "error": f"{type(err).__name__}: {err}"}
    finally:
        shutdown_distributed()
    if args.out:
        write_file_atomically(args.out, json.dumps(row, indent=1))
    return 1 if "error" in row else 0


# --- the parent: one child per row -------------------------------------------------------------------------------


def child_env(device: torch.device) -> dict:
    """The environment of a row's child: only `device` visible (the Trainer takes the current GPU, or the CPU when it
    sees none), and none of a launcher's rank variables."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    if device.type == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    elif device.index is not None:
        visible = env.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        env["CUDA_VISIBLE_DEVICES"] = ids[device.index]
    return env


def run_in_child(shape_name: str, variant: str, args) -> dict:
    """One trainer row in its own `python -m tools.bench --mode trainer-row` process; its log streams through."""
    workdir = Path(args.workdir)
    out = workdir / "rows" / f"{shape_name}-{variant}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    device = torch.device(args.device)
    # child_env leaves the child one GPU, its cuda:0, or none
    cmd = [sys.executable, "-m", "tools.bench", "--mode", "trainer-row", "--shape", shape_name, "--variants", variant,
           "--device", device.type, "--warmup", str(args.warmup), "--iters", str(args.iters),
           "--workdir", str(workdir), "--out", str(out)]
    log(f"    child: {' '.join(cmd[1:])}")
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(device), check=False)
    if out.is_file():
        return json.loads(out.read_text())
    return {"shape": shape_name, "variant": variant,
            "error": f"the trainer-row child exited with code {proc.returncode} and wrote no row"}
