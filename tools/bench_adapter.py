"""Micro-benchmark: forward + backward time of one MSPLoRALinear against a plain LoRA layer of the same total rank
(r = r_G + r_M + r_L) and against the bare frozen base Linear, on the same shapes. Not a test.

Each timed step is y = layer(x); y.backward(grad) with x requiring grad (as inside a network: the input gradient
flows through the adapter too) and the base weight frozen. Variants are interleaved in a rotating order, so
drift in the machine's speed (other processes, clocks) hits all of them alike; medians are reported.

    python -m tools.bench_adapter                       # CPU, fp32, 2048x2048, 512 tokens, ranks 64,32,16 (~30 s)
    python -m tools.bench_adapter --in-features 4096 --out-features 4096 --tokens 2048 --iters 10
    python -m tools.bench_adapter --device cuda --dtype bf16 --in-features 4096 --out-features 4096 --tokens 2048 --iters 200

Variants:
  base       the frozen nn.Linear alone
  lora-peft  peft.tuners.lora.Linear, rank r_G + r_M + r_L, dropout 0 (skipped when peft is not installed)
  lora-plain the same LoRA written out: base(x) + s * (x A^T) B^T
  msplora    MSPLoRALinear with three LoRAPairs of ranks (r_G, r_M, r_L), dropout 0
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch
from torch import nn

from msplora_dist import LoRAPair, MSPLoRAConfig, MSPLoRALinear

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class PlainLoRA(nn.Module):
    """base(x) + s * B A x, the textbook LoRA layer (reference for the pure arithmetic cost)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dtype: torch.dtype, device):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.normal_(self.lora_B, std=0.02)
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scale


def build_variants(args) -> dict[str, nn.Module]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    ranks = tuple(int(r) for r in args.ranks.split(","))
    total_rank = sum(ranks)
    torch.manual_seed(0)

    def frozen_base() -> nn.Linear:
        base = nn.Linear(args.in_features, args.out_features, bias=False, device=device, dtype=dtype)
        base.weight.requires_grad_(False)
        return base

    variants: dict[str, nn.Module] = {"base": frozen_base()}
    try:
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLoraLinear

        lora_config = LoraConfig(r=total_rank, lora_alpha=args.alpha, lora_dropout=0.0)
        peft_layer = PeftLoraLinear(frozen_base(), "default", lora_config, r=total_rank, lora_alpha=args.alpha, lora_dropout=0.0)
        peft_layer.to(device=device, dtype=dtype)
        nn.init.normal_(peft_layer.lora_B["default"].weight, std=0.02)
        variants["lora-peft"] = peft_layer
    except ImportError:
        print("peft not installed: skipping lora-peft", file=sys.stderr)
    variants["lora-plain"] = PlainLoRA(frozen_base(), total_rank, args.alpha, dtype, device)

    config = MSPLoRAConfig(ranks=ranks, alphas=args.alpha, dropout=0.0)
    pairs = tuple(LoRAPair(args.in_features, args.out_features, r, init_lora_weights=False, dtype=dtype, device=device)
                  if r else None for r in ranks)
    msp = MSPLoRALinear(frozen_base(), pairs, tuple(config.scale(i) for i in range(3)), config.dropout)
    msp.owned_pairs = nn.ModuleList([p for p in pairs if p is not None])  # in a model the hierarchy owns them
    variants["msplora"] = msp
    for m in variants.values():
        m.train()
    return variants


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in-features", type=int, default=2048)
    parser.add_argument("--out-features", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=512, help="batch x sequence length, flattened")
    parser.add_argument("--ranks", default="64,32,16", help="r_G,r_M,r_L of MSPLoRA; LoRA gets their sum")
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--iters", type=int, default=15, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    variants = build_variants(args)
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(args.tokens, args.in_features, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    grad = torch.randn(args.tokens, args.out_features, generator=gen).to(device=device, dtype=dtype)

    def step(module: nn.Module) -> float:
        x.grad = None
        for p in module.parameters():
            p.grad = None
        sync()
        t0 = time.perf_counter()
        module(x).backward(grad)
        sync()
        return time.perf_counter() - t0

    names = list(variants)
    for _ in range(args.warmup):
        for name in names:
            step(variants[name])
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(args.iters):
        order = names[i % len(names):] + names[:i % len(names)]  # rotate who goes first
        for name in order:
            times[name].append(step(variants[name]))

    med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    ranks = args.ranks
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} in={args.in_features} "
          f"out={args.out_features} tokens={args.tokens} msplora ranks=({ranks}) lora r={sum(int(r) for r in ranks.split(','))} "
          f"iters={args.iters} warmup={args.warmup}")
    print(f"{'variant':<11} {'median ms':>10} {'min ms':>9} {'max ms':>9}   forward+backward")
    for name in names:
        print(f"{name:<11} {med[name]:>10.3f} {min(times[name]) * 1e3:>9.3f} {max(times[name]) * 1e3:>9.3f}")
    for ref in ("lora-peft", "lora-plain"):
        if ref not in med:
            continue
        line = f"msplora / {ref}: {med['msplora'] / med[ref]:.3f}x"
        over_msp, over_ref = med["msplora"] - med["base"], med[ref] - med["base"]
        if over_ref > 0:
            line += f"; adapter time over base {over_msp:.3f} ms vs {over_ref:.3f} ms ({over_msp / over_ref:.2f}x)"
        print(line)


if __name__ == "__main__":
    main()
