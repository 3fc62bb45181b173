"""--mode speed: the variant table. Every in-process variant gets a fresh model and the same token batch; a timed
step is forward + backward + optimizer step, CUDA-synchronised; warm-up steps are excluded and the median of the
timed steps is reported. The trainer rows (ds-*) run the real Trainer, each in its own process (trainer_rows.py)."""

from __future__ import annotations

import contextlib
import json
import statistics
import time
import traceback
from pathlib import Path

import torch

from msplora_dist.errors import ConfigError
from tools.bench.layer import previous_msplora_forward
from tools.bench.models import (
    ALL_TARGETS,
    MATCHED_RANKS,
    PEAK_TFLOPS,
    SHAPES,
    build_model,
    enable_checkpointing,
    environment,
    free_memory,
    log,
    loss_fn,
    param_count,
    peft_lora,
)
from tools.bench.trainer_rows import TRAINER_VARIANTS, run_in_child

DEFAULT_VARIANTS = ("base", "peft-tuned", "msplora", "msplora-prev", "msplora-bf16", "peft-standard", "paper-msplora",
                    "paper-peft", "msplora-nockpt", "ds-zero2", "ds-zero3")
IN_PROCESS = ("base", "peft-standard", "peft-tuned", "paper-peft", "msplora", "msplora-prev", "msplora-bf16",
              "msplora-nockpt", "paper-msplora")
# Variants that make sense per shape (the paper setting is a 7B one; before/after and no-checkpointing once).
PER_SHAPE = {"1b": ("base", "peft-tuned", "peft-standard", "msplora", "ds-zero2", "ds-zero3")}


class Run:
    """One variant, ready to step: .step() does forward, backward and the optimizer step."""

    def __init__(self, step, trainable: int, checkpointing: bool, note: str = "", context=None):
        self.step, self.trainable, self.checkpointing, self.note = step, trainable, checkpointing, note
        self.context = context or contextlib.nullcontext()


def _optimizer_step(params):
    opt = torch.optim.AdamW(params, lr=1e-5)

    def update():
        opt.step()
        opt.zero_grad(set_to_none=True)

    return opt, update


def _peft(model, r: int, targets, dropout: float, *, standard: bool):
    from peft import prepare_model_for_kbit_training

    if standard:
        model = prepare_model_for_kbit_training(model)  # its own checkpointing (defaults)
    else:
        enable_checkpointing(model, reentrant=False)
    return peft_lora(model, r, targets, dropout, adapter_dtype=None if standard else torch.bfloat16)


def make_variant(name: str, shape_name: str, shape: dict, device: torch.device, ids: torch.Tensor) -> Run:
    from msplora_dist import MSPLoRAConfig, adapter_params, apply_msplora

    model = build_model(shape, device)
    matched = MATCHED_RANKS[shape_name]

    def train_step(m, update, autocast: bool = False):
        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
                loss = loss_fn(m, ids)
            loss.backward()
            update()
        return step

    if name == "base":
        enable_checkpointing(model)
        model.enable_input_require_grads()
        return Run(train_step(model, lambda: None), 0, True, "frozen 4-bit base, inputs require grad")
    if name in ("peft-standard", "peft-tuned", "paper-peft"):
        standard = name == "peft-standard"
        r, targets, dropout = (64, ("q_proj", "v_proj"), 0.05) if name == "paper-peft" else \
            (16, ALL_TARGETS, 0.05 if standard else 0.0)
        model, params = _peft(model, r, targets, dropout, standard=standard)
        _, update = _optimizer_step(params)
        ckpt_kind = "PEFT default (reentrant)" if standard else "non-reentrant"
        return Run(train_step(model, update, autocast=standard), sum(p.numel() for p in params), True,
                   f"r={r} {','.join(t[0] if t != 'down_proj' else 'd' for t in targets)} dropout={dropout} "
                   f"{'fp32 adapters, autocast bf16' if standard else 'bf16 adapters'}, {ckpt_kind}")
    if name in ("msplora", "msplora-prev", "msplora-bf16", "msplora-nockpt", "paper-msplora"):
        if name == "paper-msplora":
            cfg = MSPLoRAConfig.paper(dropout=0.05)
        else:
            cfg = MSPLoRAConfig(ranks=matched, alphas=16, num_mid_groups=3, target_modules=ALL_TARGETS, dropout=0.0)
        ckpt = name != "msplora-nockpt"
        if ckpt:
            enable_checkpointing(model)
        else:
            model.enable_input_require_grads()  # what load_backbone's checkpointing does; same gradient work
        adapter_dtype = torch.bfloat16 if name == "msplora-bf16" else torch.float32
        model = apply_msplora(model, cfg, adapter_dtype=adapter_dtype)
        params = list(adapter_params(model).values())
        _, update = _optimizer_step(params)
        context = previous_msplora_forward() if name == "msplora-prev" else None
        return Run(train_step(model, update), sum(p.numel() for p in params), ckpt,
                   f"ranks={cfg.ranks} {len(cfg.target_modules)} targets dropout={cfg.dropout[0]} "
                   f"{'bf16' if adapter_dtype == torch.bfloat16 else 'fp32'} adapters",
                   context=context)
    raise AssertionError(f"{name!r} is not an in-process variant")  # speed() checks the names first


def measure(name: str, shape_name: str, device: torch.device, warmup: int, iters: int) -> dict:
    shape = SHAPES[shape_name]
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    free_memory(device)
    leftover = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(4, shape["vocab_size"], (shape["batch"], shape["seq"]), generator=g).to(device)
    t_build = time.perf_counter()
    run = make_variant(name, shape_name, shape, device, ids)
    build_s = time.perf_counter() - t_build
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with run.context:
        for i in range(warmup + iters):
            sync()
            t0 = time.perf_counter()
            run.step()
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(device) - leftover) / 2**30 if device.type == "cuda" else float("nan")
    info = {"trainable": run.trainable, "checkpointing": run.checkpointing, "note": run.note}
    del run
    free_memory(device)
    tokens = shape["batch"] * shape["seq"]
    step_s = statistics.median(times)
    return {"shape": shape_name, "variant": name, "tokens_per_step": tokens, "step_s_median": step_s,
            "step_s_all": times, "tokens_per_s": tokens / step_s, "peak_mem_gb": peak, "build_s": build_s,
            "base_params": param_count(shape), "leftover_gb_before": leftover / 2**30, **info}


def add_derived(rows: list[dict]) -> None:
    for row in rows:
        if "error" in row:
            continue
        k = 8 if row["checkpointing"] else 6
        row["flops_per_token"] = k * row["base_params"]
        row["mfu"] = row["tokens_per_s"] * row["flops_per_token"] / (PEAK_TFLOPS * 1e12)
        same = {r["variant"]: r for r in rows if r.get("shape") == row["shape"] and "error" not in r}
        if "peft-tuned" in same:
            row["speed_vs_peft_tuned"] = row["tokens_per_s"] / same["peft-tuned"]["tokens_per_s"]
            row["mem_vs_peft_tuned"] = row["peak_mem_gb"] / same["peft-tuned"]["peak_mem_gb"]
        if "base" in same:
            row["time_over_base"] = row["step_s_median"] / same["base"]["step_s_median"] - 1


def print_table(rows: list[dict]) -> None:
    log(f"{'shape':<6}{'variant':<16}{'tok/s':>9}{'step s':>8}{'peak GB':>9}{'MFU':>7}{'vs tuned':>9}{'over base':>10}"
        f"{'trainable':>12}  note")
    for r in rows:
        if "error" in r:
            log(f"{r['shape']:<6}{r['variant']:<16}  ERROR {r['error'][:100]}")
            continue
        log(f"{r['shape']:<6}{r['variant']:<16}{r['tokens_per_s']:>9.0f}{r['step_s_median']:>8.3f}{r['peak_mem_gb']:>9.2f}"
            f"{r.get('mfu', float('nan')):>7.1%}{r.get('speed_vs_peft_tuned', float('nan')):>9.3f}"
            f"{r.get('time_over_base', float('nan')):>+10.1%}{r.get('trainable', 0):>12,}  {r.get('note', '')}")


def speed(args) -> list[dict]:
    device = torch.device(args.device)
    shapes = args.shapes.split(",")
    variants = args.variants.split(",") if args.variants else None
    known = (*IN_PROCESS, *TRAINER_VARIANTS)
    for kind, names, allowed in (("shape", shapes, SHAPES), ("variant", variants or (), known)):
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise ConfigError(f"--{kind}s: unknown {kind} {unknown[0]!r}; expected some of {', '.join(allowed)}")
    plan = [(shape, v) for shape in shapes for v in variants or PER_SHAPE.get(shape, DEFAULT_VARIANTS)]
    out = Path(args.out) if args.out else None
    result = {"env": environment(device), "args": vars(args), "peak_tflops": PEAK_TFLOPS, "rows": []}
    for shape, name in plan:
        log(f"--- {shape} {name}")
        if name in TRAINER_VARIANTS:
            row = run_in_child(shape, name, args)
        else:
            try:
                row = measure(name, shape, device, args.warmup, args.iters)
            except Exception as err:  # keep going: one failing variant must not lose the others
                traceback.print_exc()
                row = {"shape": shape, "variant": name, "error": f"{type(err).__name__}: {err}"}
                free_memory(device)
        result["rows"].append(row)
        add_derived(result["rows"])
        if "error" not in row:
            log(f"    {row['tokens_per_s']:.0f} tok/s, step {row['step_s_median']:.3f} s, peak {row['peak_mem_gb']:.2f} GB, "
                f"build {row['build_s']:.1f} s, steps {[round(t, 3) for t in row['step_s_all']]}")
        if out:
            out.write_text(json.dumps(result, indent=1))
    print_table(result["rows"])
    return result["rows"]
