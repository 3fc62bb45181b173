"""--mode layer and --mode check: one MSPLoRALinear projection, timed against the 4-bit base and PEFT's LoRA layer,
and its numerics against a float64 reference; both also for the forward as it was before issue 7 ("msplora-prev",
kept here, frozen, so that before/after numbers stay measurable on any machine: docs/benchmarks.md)."""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tools.bench.models import MATCHED_RANKS, environment, log

# --- the previous MSPLoRALinear forward (before/after) ---------------------------------------------------------


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
