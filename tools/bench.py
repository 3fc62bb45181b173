"""Speed and memory of MSPLoRA against PEFT (Q)LoRA on a 4-bit Llama, in ONE process, on identical shapes and
tokens; plus the helpers of the multi-GPU scaling runs (docs/scaling.md). Not a test; results in docs/benchmarks.md.

    python launch/bench.py --out bench.json                      # GPU: 7B and 1.1B shapes, every variant (~6 min)
    python launch/bench.py --shapes 7b --variants base,peft-tuned,msplora --out bench.json
    python launch/bench.py --cpu-smoke --out /tmp/smoke.json     # tiny shapes on CPU, seconds (tests/test_bench.py)
    python launch/bench.py --mode layer --out layer.json         # one projection: base / PEFT / MSPLoRA (now and before)
    python launch/bench.py --mode check                          # MSPLoRALinear now and before against float64
    python launch/bench.py --mode make-model|make-data|compare|scaling-report ...   # docs/scaling.md

Models are Llama shapes with random weights built from a LlamaConfig (nothing from the hub), directly in bf16 on
the device, then every decoder-layer projection becomes a bitsandbytes NF4 Linear4bit with double quantization,
bf16 compute and bf16 storage: what transformers builds for `--load_in_4bit true` (msplora_dist/backbone.py).
Each variant gets a fresh model and the same token batch; a timed step is forward + backward + optimizer step,
CUDA-synchronised; warm-up steps are excluded and the median of the timed steps is reported.

Variants (r = LoRA rank; "all" = q,k,v,o,gate,up,down):
  base            the frozen 4-bit model alone (inputs require grad so backward runs through every layer), with
                  non-reentrant checkpointing: the floor every adapter pays on top of
  peft-standard   PEFT LoRA r=16 all, the common QLoRA recipe as the Hugging Face Trainer runs it with bf16=True:
                  prepare_model_for_kbit_training (norms, embeddings and lm_head cast to fp32, its own checkpointing:
                  torch's default, reentrant), fp32 adapters, dropout 0.05, forward under torch.autocast(bf16)
  peft-tuned      PEFT LoRA r=16 all, everything bf16 (adapters too), non-reentrant checkpointing, dropout 0
  msplora         apply_msplora, all targets, ranks with the same trainable parameter count as peft-tuned
                  (within a few %), dropout 0, fp32 adapters (bf16 math), non-reentrant checkpointing
  msplora-prev    the same with MSPLoRALinear's forward as it was before this benchmark (before/after numbers)
  msplora-bf16    msplora with bf16 adapter tensors (what DeepSpeed's bf16 mode holds in the module; no casts)
  msplora-nockpt  msplora without gradient checkpointing (speed ceiling, at the memory of all activations)
  paper-msplora   the paper's setting: MSPLoRA (64,32,16) on q,v, 3 groups, dropout 0.05
  paper-peft      PEFT LoRA r=64 on q,v, dropout 0.05 (bf16, non-reentrant, like peft-tuned)
  ds-zero2        msplora through the trainer's path: deepspeed.initialize with ds_configs/zero2.json resolved by
                  msplora_dist.dist.ds_config.resolve_ds_config, one GPU
  ds-zero3        the same with ds_configs/zero3.json (the backbone "partitioned" over one rank: every module's
                  weights are gathered before its forward, its recomputation and its backward)
  ds-zero1        ds_configs/zero2.json with stage 1 (not in the default list)
  ds-zero2-nooverlap  ds_configs/zero2.json with overlap_comm false (not in the default list)

MFU = tokens/s x k x N / peak, with N the parameter count of the base model (bf16 count, embeddings and lm_head
included), k = 8 with activation recomputation (forward, recomputed forward, backward = 2 forwards) and 6 without,
peak = 790 TFLOP/s (bf16 dense matrix rate measured on this workplace's H200). This is the usual "model flops" count:
it ignores attention's s^2 term, and a frozen base computes no weight gradients (its real work is 4N or 6N), so it
states throughput on a common scale rather than the matrix units' real load.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEAK_TFLOPS = 790.0

SHAPES = {
    # Llama-2-7B: 6.74 B parameters.
    "7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, batch=4, seq=2048),
    # TinyLlama-1.1B: 1.10 B parameters, grouped-query attention.
    "1b": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, batch=8, seq=2048),
    # CPU smoke test: the same code paths in a second or so.
    "smoke": dict(hidden_size=64, num_hidden_layers=4, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024, batch=2, seq=32),
}
# MSPLoRA ranks with the trainable parameter count of LoRA r=16 on all 7 targets: r_G + G r_M + L r_L = 16 L.
MATCHED_RANKS = {"7b": (48, 16, 13), "1b": (40, 16, 12), "smoke": (16, 8, 6)}
DEFAULT_VARIANTS = ("base", "peft-tuned", "msplora", "msplora-prev", "msplora-bf16", "peft-standard", "paper-msplora",
                    "paper-peft", "msplora-nockpt", "ds-zero2", "ds-zero3")
# Variants that make sense per shape (the paper setting is a 7B one; before/after and no-checkpointing once).
PER_SHAPE = {"1b": ("base", "peft-tuned", "peft-standard", "msplora", "ds-zero2", "ds-zero3")}


def log(msg: str) -> None:
    print(msg, flush=True)


# --- models ---------------------------------------------------------------------------------------------------


def llama_config(shape: dict):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                      intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_hidden_layers"],
                      num_attention_heads=shape["num_attention_heads"], num_key_value_heads=shape["num_key_value_heads"],
                      max_position_embeddings=max(shape["seq"], 2048), rms_norm_eps=1e-5, tie_word_embeddings=False,
                      use_cache=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    cfg._attn_implementation = "sdpa"
    return cfg


def param_count(shape: dict) -> int:
    """Parameters of the bf16 Llama (embeddings, lm_head and norms included)."""
    h, i, L, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return L * per_layer + 2 * v * h + h


def build_model(shape: dict, device: torch.device, *, quantize: bool = True, dtype=torch.bfloat16):
    """A random-weight Llama of this shape in `dtype` on `device`; its decoder projections NF4 Linear4bit."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(llama_config(shape))
    finally:
        torch.set_default_dtype(previous)
    model.config.use_cache = False
    if quantize:
        quantize_4bit_(model, dtype, device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.train()


def quantize_4bit_(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Replace every nn.Linear of the decoder layers by bnb's Linear4bit (NF4, double quantization, compute and
    storage dtype `dtype`), quantizing the existing weights; the model then looks like from_pretrained's."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for name, lin in list(layer.named_modules()):
            if type(lin) is not nn.Linear:
                continue
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=dtype,
                                  compress_statistics=True, quant_type="nf4", quant_storage=dtype, device="meta")
            q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", quant_storage=dtype, module=q)
            if lin.bias is not None:
                q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
            q = q.to(device)  # quantizes
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, child, q)
    model.is_loaded_in_4bit = True  # what PEFT reads to pick its bnb 4-bit LoRA layer


def enable_checkpointing(model, reentrant: bool = False) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})


def loss_fn(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean shifted token cross-entropy in fp32 (the trainer's loss_sum, averaged)."""
    logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


# --- the previous MSPLoRALinear forward (before/after) -----------------------------------------------------------


def _prev_adapter_output(self, x):
    dtype = x.dtype
    if not self.training or not any(self.dropout):
        A = torch.cat([p.lora_A.to(dtype) for p in self._pairs], dim=0)
        hidden = F.linear(x, A)
    else:
        hidden = torch.cat([F.linear(F.dropout(x, p=d, training=True) if d else x, pair.lora_A.to(dtype))
                            for pair, d in zip(self._pairs, self.dropout, strict=True)], dim=-1)
    B = torch.cat([p.lora_B.to(dtype) * s for p, s in zip(self._pairs, self.scales, strict=True)], dim=1)
    return F.linear(hidden, B)


def _prev_forward(self, x):
    out = self.base_layer(x)
    if self.merged or not self.adapter_enabled or not self._pairs:
        return out
    return out + _prev_adapter_output(self, x).to(out.dtype)


@contextlib.contextmanager
def previous_msplora_forward():
    from msplora_dist.adapters.layers import MSPLoRALinear

    saved = MSPLoRALinear.forward
    MSPLoRALinear.forward = _prev_forward
    try:
        yield
    finally:
        MSPLoRALinear.forward = saved


# --- variants -------------------------------------------------------------------------------------------------


class Run:
    """One variant, ready to step: .step() does forward, backward and the optimizer step."""

    def __init__(self, step, trainable: int, checkpointing: bool, note: str = "", cleanup=None, context=None):
        self.step, self.trainable, self.checkpointing, self.note = step, trainable, checkpointing, note
        self.cleanup, self.context = cleanup, context or contextlib.nullcontext()


def _optimizer_step(params):
    opt = torch.optim.AdamW(params, lr=1e-5)

    def update():
        opt.step()
        opt.zero_grad(set_to_none=True)

    return opt, update


def _peft(model, r: int, targets, dropout: float, *, standard: bool):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if standard:
        model = prepare_model_for_kbit_training(model)  # its own checkpointing (defaults)
    else:
        enable_checkpointing(model, reentrant=False)
    config = LoraConfig(r=r, lora_alpha=16, lora_dropout=dropout, target_modules=list(targets), bias="none",
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config, autocast_adapter_dtype=standard)
    params = [p for p in model.parameters() if p.requires_grad]
    if not standard:
        for p in params:
            p.data = p.data.to(torch.bfloat16)
    return model, params


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
    if name in ("ds-zero1", "ds-zero2", "ds-zero2-nooverlap", "ds-zero3"):
        return _deepspeed_variant(name, model, shape, matched, device, ids)
    raise SystemExit(f"unknown variant {name!r}; expected one of {', '.join(DEFAULT_VARIANTS)}")


def _deepspeed_variant(name, model, shape, ranks, device, ids) -> Run:
    """The trainer's path (launch/train.py): adapters from apply_msplora, the config resolved from the shipped JSON,
    deepspeed.initialize on the adapter parameters, engine.backward / engine.step."""
    import deepspeed

    from msplora_dist import MSPLoRAConfig, adapter_params, apply_msplora
    from msplora_dist.dist.ds_config import read_ds_config, resolve_ds_config
    from msplora_dist.dist.process import init_distributed
    from msplora_dist.dist.zero import register_adapters_with_zero3
    from msplora_dist.train.config import TrainConfig

    init_distributed(on_gpu=device.type == "cuda")
    stage = {"ds-zero1": 1, "ds-zero3": 3}.get(name, 2)
    enable_checkpointing(model)
    cfg = MSPLoRAConfig(ranks=ranks, alphas=16, num_mid_groups=3, target_modules=ALL_TARGETS, dropout=0.0)
    model = apply_msplora(model, cfg)
    params = adapter_params(model)
    trainable = sum(p.numel() for p in params.values())  # before ZeRO-3 partitions them
    train_cfg = TrainConfig(micro_batch_size=shape["batch"], grad_accum=1, ranks=ranks, dropout=(0.0,) * 3,
                            num_mid_groups=3, max_grad_norm=1.0, lr=1e-5)
    raw = read_ds_config(REPO / "ds_configs" / f"zero{max(stage, 2)}.json")
    raw["zero_optimization"]["stage"] = stage
    if name == "ds-zero2-nooverlap":
        raw["zero_optimization"]["overlap_comm"] = False
    ds_config = resolve_ds_config(raw, train_cfg, world_size=1,
                                  dtype="bf16" if device.type == "cuda" else "fp32",
                                  largest_adapter_numel=max(p.numel() for p in params.values()))
    if stage == 3:
        register_adapters_with_zero3(model)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=list(params.values()), config=ds_config)

    def step():
        loss = loss_fn(engine, ids)
        engine.backward(loss)
        engine.step()

    def cleanup():
        with contextlib.suppress(Exception):
            engine.destroy()

    return Run(step, trainable, True, f"ranks={ranks} ds_configs/zero{max(stage, 2)}.json resolved"
               + {"ds-zero1": ", stage 1", "ds-zero2-nooverlap": ", overlap_comm false"}.get(name, ""), cleanup=cleanup)


# --- timing ---------------------------------------------------------------------------------------------------


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


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
    if run.cleanup:
        run.cleanup()
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


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device)}
    for mod in ("transformers", "peft", "bitsandbytes", "deepspeed"):
        with contextlib.suppress(Exception):
            env[mod] = __import__(mod).__version__
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


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
    plan = []
    for shape in shapes:
        names = variants or list(PER_SHAPE.get(shape, DEFAULT_VARIANTS))
        plan += [(shape, v) for v in names]
    # DeepSpeed variants last: ZeRO-3 leaves hooks and distributed state behind.
    plan.sort(key=lambda sv: sv[1].startswith("ds-"))
    out = Path(args.out) if args.out else None
    result = {"env": environment(device), "args": vars(args), "peak_tflops": PEAK_TFLOPS, "rows": []}
    for shape, name in plan:
        log(f"--- {shape} {name}")
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


# --- one projection -------------------------------------------------------------------------------------------


def layer_bench(args) -> list[dict]:
    """Forward + backward of one 4-bit projection with x requiring grad (as inside a network), CUDA events,
    variants interleaved in rotating order, medians."""
    import bitsandbytes as bnb
    from peft import LoraConfig, inject_adapter_in_model

    from msplora_dist import LoRAPair, MSPLoRAConfig, MSPLoRALinear

    device = torch.device(args.device)
    dtype = torch.bfloat16
    shapes = [(4096, 4096), (4096, 11008), (11008, 4096)] if not args.cpu_smoke else [(64, 96)]
    token_counts = [int(t) for t in args.tokens.split(",")] if not args.cpu_smoke else [16]
    ranks = MATCHED_RANKS["7b"] if not args.cpu_smoke else MATCHED_RANKS["smoke"]
    rows = []
    for fin, fout in shapes:
        def base(fin=fin, fout=fout):
            torch.manual_seed(0)
            w = torch.randn(fout, fin, device=device, dtype=dtype) * 0.02
            q = bnb.nn.Linear4bit(fin, fout, bias=False, compute_dtype=dtype, compress_statistics=True,
                                  quant_type="nf4", quant_storage=dtype, device="meta")
            q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                         quant_storage=dtype, module=q)
            return q.to(device)

        holder = nn.Module()
        holder.proj = base()
        holder.is_loaded_in_4bit = True
        inject_adapter_in_model(LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=["proj"]), holder)
        for p in holder.parameters():
            if p.requires_grad:
                p.data = p.data.to(dtype)
                torch.nn.init.normal_(p, std=0.02)
        cfg = MSPLoRAConfig(ranks=ranks, alphas=16, dropout=0.0)
        pairs = tuple(LoRAPair(fin, fout, r, init_lora_weights=False, device=device) for r in ranks)
        msp = MSPLoRALinear(base(), pairs, tuple(cfg.scale(i) for i in range(3)), cfg.dropout)
        msp.owned = nn.ModuleList(pairs)
        variants = {"base4bit": base(), "peft-lora16": holder.proj, "msplora": msp, "msplora-prev": msp}
        for tokens in token_counts:
            x = torch.randn(tokens, fin, device=device, dtype=dtype).requires_grad_(True)
            grad = torch.randn(tokens, fout, device=device, dtype=dtype)
            names = list(variants)

            def one(name, variants=variants, x=x, grad=grad):
                mod = variants[name]
                ctx = previous_msplora_forward() if name == "msplora-prev" else contextlib.nullcontext()
                x.grad = None
                for p in mod.parameters():
                    p.grad = None
                with ctx:
                    mod(x).backward(grad)

            times = {n: [] for n in names}
            for i in range(args.layer_warmup + args.layer_iters):
                order = names[i % len(names):] + names[:i % len(names)]
                for n in order:
                    if device.type == "cuda":
                        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        start.record()
                        one(n)
                        end.record()
                        end.synchronize()
                        dt = start.elapsed_time(end) / 1e3
                    else:
                        t0 = time.perf_counter()
                        one(n)
                        dt = time.perf_counter() - t0
                    if i >= args.layer_warmup:
                        times[n].append(dt)
            med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
            for n in names:
                rows.append({"in": fin, "out": fout, "tokens": tokens, "variant": n, "ms": med[n],
                             "over_base_ms": med[n] - med["base4bit"]})
            log(f"in={fin} out={fout} tokens={tokens}: " + ", ".join(f"{n} {med[n]:.3f} ms" for n in names))
    if args.out:
        Path(args.out).write_text(json.dumps({"env": environment(device), "ranks": ranks, "rows": rows}, indent=1))
    return rows


# --- numerics of MSPLoRALinear on the device -------------------------------------------------------------------


def check_layer(args) -> list[dict]:
    """MSPLoRALinear as it runs now (rank padding on CUDA, addmm) and as it ran before, against a float64 reference
    on the CPU: ||out - ref|| / ||ref|| for the output, the input gradient and every adapter gradient; fresh random
    inputs and B != 0, bf16 activations, fp32 adapter masters, frozen bf16 base."""
    from msplora_dist import LoRAPair, MSPLoRAConfig, MSPLoRALinear

    device = torch.device(args.device)
    cases = [((48, 16, 13), 4096, 11008, 0.0), ((64, 32, 16), 4096, 4096, 0.0), ((8, 4, 2), 4096, 4096, 0.0),
             ((48, 16, 13), 11008, 4096, 0.0)]
    if args.cpu_smoke:
        cases = [((5, 3, 2), 64, 96, 0.0)]
    tokens = 16 if args.cpu_smoke else 4096
    rows = []
    for seed, (ranks, fin, fout, drop) in enumerate(cases):
        torch.manual_seed(100 + seed)
        cfg = MSPLoRAConfig(ranks=ranks, alphas=16, dropout=drop)
        pairs = tuple(LoRAPair(fin, fout, r, init_lora_weights=False, device=device) for r in ranks)
        base = nn.Linear(fin, fout, bias=False, device=device, dtype=torch.bfloat16)
        base.weight.requires_grad_(False)
        layer = MSPLoRALinear(base, pairs, tuple(cfg.scale(i) for i in range(3)), cfg.dropout).train()
        x0 = torch.randn(2, tokens // 2, fin, device=device).to(torch.bfloat16)
        g = torch.randn(2, tokens // 2, fout, device=device).to(torch.bfloat16)

        def run(ctx, pairs=pairs, x0=x0, layer=layer, g=g):
            for p in pairs:
                p.lora_A.grad = p.lora_B.grad = None
            x = x0.clone().requires_grad_(True)
            with ctx:
                y = layer(x)
            y.backward(g)
            return [y.detach(), x.grad] + [t.grad.clone() for p in pairs for t in (p.lora_A, p.lora_B)]

        now, before = run(contextlib.nullcontext()), run(previous_msplora_forward())
        # float64 reference on the CPU
        xd, gd = x0.double().cpu().requires_grad_(True), g.double().cpu()
        leaves = [t.detach().double().cpu().requires_grad_(True) for p in pairs for t in (p.lora_A, p.lora_B)]
        y = xd @ base.weight.double().cpu().T
        for i in range(3):
            y = y + cfg.scale(i) * (xd @ leaves[2 * i].T) @ leaves[2 * i + 1].T
        y.backward(gd)
        ref = [y.detach(), xd.grad] + [t.grad for t in leaves]
        names = ["out", "grad_x"] + [f"grad_{lv}_{ab}" for lv in ("G", "M", "L") for ab in ("A", "B")]

        def rel(a, r):
            return ((a.double().cpu() - r).norm() / r.norm()).item()

        row = {"ranks": ranks, "in": fin, "out": fout, "tokens": tokens,
               "now": {n: rel(a, r) for n, a, r in zip(names, now, ref, strict=True)},
               "before": {n: rel(a, r) for n, a, r in zip(names, before, ref, strict=True)},
               "finite": all(bool(torch.isfinite(t).all()) for t in now)}
        rows.append(row)
        log(f"ranks={ranks} {fin}->{fout}: max rel err now {max(row['now'].values()):.2e} "
            f"before {max(row['before'].values()):.2e}; out now {row['now']['out']:.2e} before {row['before']['out']:.2e}")
    if args.out:
        Path(args.out).write_text(json.dumps({"env": environment(device), "rows": rows}, indent=1))
    return rows


# --- helpers of the scaling runs (docs/scaling.md) -----------------------------------------------------------


def make_model_dir(args) -> None:
    """A random bf16 Llama of --shape saved as a Hugging Face directory, with the shipped tiny tokenizer (its ids
    are a subset of any vocabulary: throughput does not depend on which tokens they are)."""
    device = torch.device(args.device)
    shape = SHAPES[args.shape]
    model = build_model(shape, device, quantize=False)
    model.config.use_cache = True
    out = Path(args.save_dir)
    model.save_pretrained(out, safe_serialization=True)
    tiny = REPO / "msplora_dist" / "assets" / "tiny_llama"
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny / name).exists():
            shutil.copy(tiny / name, out / name)
    log(f"saved {param_count(shape):,} parameters of shape {args.shape} to {out}")


def make_data(args) -> None:
    """Plain-text rows of random words, each longer than --min_tokens tokens of the tiny tokenizer."""
    import random

    words = sorted({w for line in (REPO / "msplora_dist/assets/data/text.jsonl").read_text().splitlines()
                    for w in json.loads(line)["text"].replace(".", " ").split() if w.isalpha()})
    rng = random.Random(0)
    n_words = int(args.min_tokens / 1.1) + 50  # the tiny tokenizer spends ~1.25 tokens a word
    with open(args.save_dir, "w") as fh:
        for _ in range(args.rows):
            fh.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(n_words))}) + "\n")
    log(f"wrote {args.rows} rows of {n_words} words to {args.save_dir}")


def compare_runs(args) -> dict:
    """Adapters and loss histories of two training runs ({output_dir}/adapter, summary.json)."""
    from safetensors.torch import load_file

    a_dir, b_dir = Path(args.runs[0]), Path(args.runs[1])
    a = load_file(a_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(b_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys(), "different adapter keys"
    diffs = {k: ((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp_min(1e-30)).item() for k in a}
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a_dir, b_dir))
    loss_rel = [abs(x["loss"] - y["loss"]) / abs(y["loss"]) for x, y in zip(sa["history"], sb["history"], strict=True)
                if "loss" in x and "loss" in y]
    ordered = sorted(diffs.values())
    result = {"runs": [str(a_dir), str(b_dir)], "tensors": len(diffs), "max_rel_diff": ordered[-1],
              "median_rel_diff": ordered[len(ordered) // 2], "worst": sorted(diffs.items(), key=lambda kv: -kv[1])[:3],
              "max_loss_rel_diff": max(loss_rel), "final_loss": [sa["final_loss"], sb["final_loss"]],
              "first_loss": [sa["history"][0].get("loss"), sb["history"][0].get("loss")],
              "final_eval_loss": [sa.get("final_eval_loss"), sb.get("final_eval_loss")],
              "replicas_identical": [sa["replicas_identical"], sb["replicas_identical"]],
              "world_size": [sa["world_size"], sb["world_size"]], "global_batch": [sa["global_batch"], sb["global_batch"]],
              # B starts at zero: its norm shows how far training moved the adapters.
              "lora_B_norm": [math.sqrt(sum(t.double().square().sum().item() for k, t in d.items() if "lora_B" in k))
                              for d in (a, b)]}
    log(json.dumps(result, indent=1))
    return result


def scaling_report(args) -> dict:
    """Steady-state throughput and memory of training runs (summary.json history), skipping --skip first steps."""
    rows = []
    for run in args.runs:
        s = json.loads((Path(run) / "summary.json").read_text())
        hist = s["history"][args.skip:]
        tps = [h["tokens_per_s"] for h in hist]
        rows.append({"run": run, "world_size": s["world_size"], "global_batch": s["global_batch"], "steps": s["steps"],
                     "tokens_per_s_median": statistics.median(tps), "tokens_per_s_steps": tps,
                     "peak_mem_gb": max(h.get("peak_mem_gb", float("nan")) for h in s["history"]),
                     "backbone_partition": s.get("backbone_partition"), "replicas_identical": s.get("replicas_identical"),
                     "zero_stage": s.get("zero_stage"), "final_loss": s.get("final_loss")})
    for r in rows:  # against the one-GPU run of the same ZeRO stage, when there is one
        one = next((o for o in rows if o["world_size"] == 1 and o["zero_stage"] == r["zero_stage"]), None)
        if one is not None and r["world_size"] > 1:
            r["scaling_efficiency"] = r["tokens_per_s_median"] / (r["world_size"] * one["tokens_per_s_median"])
    log(json.dumps(rows, indent=1))
    return {"rows": rows}


# --- entry ----------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="speed", choices=["speed", "layer", "check", "make-model", "make-data",
                                                             "compare", "scaling-report"])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU, every variant, seconds")
    parser.add_argument("--device", default=None, help="cuda (default when available), cuda:1, cpu")
    parser.add_argument("--shapes", default="7b,1b", help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--variants", default=None, help="comma list (default: all that apply to each shape)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--tokens", default="512,2048,8192", help="--mode layer: token counts")
    parser.add_argument("--layer-warmup", type=int, default=5)
    parser.add_argument("--layer-iters", type=int, default=30)
    parser.add_argument("--out", default=None, help="JSON results (rewritten after every variant)")
    parser.add_argument("--shape", default="7b", help="--mode make-model")
    parser.add_argument("--save-dir", default=None, help="--mode make-model/make-data: where to write")
    parser.add_argument("--rows", type=int, default=128, help="--mode make-data")
    parser.add_argument("--min_tokens", type=int, default=2100, help="--mode make-data")
    parser.add_argument("--runs", nargs="+", default=[], help="--mode compare/scaling-report: output dirs")
    parser.add_argument("--skip", type=int, default=3, help="--mode scaling-report: first steps left out")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        args.device = args.device or "cpu"
        args.shapes, args.warmup, args.iters = "smoke", 1, 1
        args.layer_warmup, args.layer_iters = 1, 1
        torch.set_num_threads(min(2, torch.get_num_threads()))
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.mode == "speed":
        from msplora_dist.dist.process import shutdown_distributed

        try:
            rows = speed(args)
        finally:
            shutdown_distributed()  # the ds-* variants started a process group
        return 1 if any("error" in r for r in rows) else 0
    if args.mode == "layer":
        layer_bench(args)
    elif args.mode == "check":
        rows = check_layer(args)
        return 0 if all(r["finite"] and max(r["now"].values()) < 2e-2 for r in rows) else 1
    elif args.mode == "make-model":
        make_model_dir(args)
    elif args.mode == "make-data":
        make_data(args)
    elif args.mode == "compare":
        result = compare_runs(args)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
    elif args.mode == "scaling-report":
        result = scaling_report(args)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
