"""Speed and memory of the real trainer (`launch/train.py`, one GPU) across its speed settings, side by side in one
run, with Unsloth as the anchor. Not a test: it prints a table and writes JSON. Each row is its own process.

    python -m tools.trainer_speed --model runs/m7b --data runs/bench7b.jsonl --out runs/trainer_speed.json \\
        --rows zero3-plain,zero3,zero3-liger,zero2,zero2-liger --anchor unsloth

--model: a model directory (python -m tools.bench --mode make-model --shape 7b writes a random-weight Llama-2-7B shape);
--data: rows longer than --seq tokens (--mode make-data). Every row: 4-bit NF4 backbone, bf16, gradient
checkpointing, MSPLoRA (48,16,13) on all 7 projections (40.0 M parameters, LoRA r=16's count at the 7B shape),
micro-batch --batch x --seq tokens, --steps steps of which the median step speed (the trainer's tokens_per_s)
and the peak GPU memory (torch.cuda.max_memory_allocated) are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

# row -> (ds_config, extra trainer flags)
ROWS = {
    "zero3-plain": ("ds_configs/zero3.json", ["--liger", "false", "--zero3_leaf_layers", "false"]),  # before issue 14
    "zero3": ("ds_configs/zero3.json", ["--liger", "false"]),
    "zero3-liger": ("ds_configs/zero3.json", ["--liger", "true"]),
    "zero2": ("ds_configs/zero2.json", ["--liger", "false"]),
    "zero2-liger": ("ds_configs/zero2.json", ["--liger", "true"]),
}


def trainer_row(name: str, args, out_dir: Path) -> dict:
    ds_config, extra = ROWS[name]
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--ds_config", ds_config, "--model", args.model,
           "--data", args.data, "--output_dir", str(out_dir / name), "--overwrite", "true", "--load_in_4bit", "true",
           "--gradient_checkpointing", "true", "--ranks", "48,16,13", "--alphas", "16", "--num_mid_groups", "3",
           "--target_modules", TARGETS, "--dropout", "0", "--micro_batch_size", str(args.batch), "--grad_accum", "1",
           "--max_seq_len", str(args.seq), "--packing", "true", "--max_steps", str(args.steps), "--eval_fraction", "0",
           "--eval_steps", "0", "--save_steps", "0", "--analyze", "false", "--lr", "1e-4", *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"row": name, "error": (proc.stderr.strip().splitlines() or ["?"])[-1], "stderr_tail": proc.stderr[-3000:]}
    s = json.loads((out_dir / name / "summary.json").read_text())
    steps = [h for h in s["history"] if "tokens_per_s" in h]
    return {"row": name, "tokens_per_s": statistics.median(h["tokens_per_s"] for h in steps[2:]),
            "peak_gb": s["peak_mem_gb_max"], "losses": [round(h["loss"], 4) for h in steps], "wall_s": time.time() - t0,
            "step_tokens_per_s": [round(h["tokens_per_s"]) for h in steps],
            "speed_features": s.get("speed_features"), "startup_s": s["startup_s"]}


UNSLOTH = r'''
import json, os, statistics, sys, time, torch
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1",
                  HF_HUB_ENABLE_HF_TRANSFER="0", HF_HOME="/tmp/hf_home", UNSLOTH_COMPILE_LOCATION="/tmp/unsloth_compiled_cache")
from unsloth import FastLanguageModel
model_dir, batch, seq, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model, _ = FastLanguageModel.from_pretrained(model_dir, max_seq_length=seq, dtype=torch.bfloat16, load_in_4bit=True,
                                             local_files_only=True)
model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                                         target_modules=sys.argv[5].split(","), use_gradient_checkpointing=True)
model = FastLanguageModel.for_training(model)  # training mode: checkpointing only acts while training
model.train()
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4)
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, 700, (batch, seq), generator=g).cuda()
speeds = []
torch.cuda.reset_peak_memory_stats()
for step in range(steps):
    torch.cuda.synchronize(); t0 = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize(); speeds.append(batch * seq / (time.perf_counter() - t0))
print(json.dumps({"row": "unsloth", "tokens_per_s": statistics.median(speeds[2:]), "step_tokens_per_s": [round(v) for v in speeds],
                  "peak_gb": torch.cuda.max_memory_allocated() / 2**30, "trainable": sum(p.numel() for p in params)}))
'''


def unsloth_row(args) -> dict:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", UNSLOTH, args.model, str(args.batch), str(args.seq), str(args.steps), TARGETS],
                          cwd="/tmp", capture_output=True, text=True)
    if proc.returncode != 0:
        return {"row": "unsloth", "error": (proc.stderr.strip().splitlines() or ["?"])[-1], "stderr_tail": proc.stderr[-3000:]}
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["wall_s"] = time.time() - t0
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--rows", default="zero3-plain,zero3,zero3-liger,zero2,zero2-liger")
    p.add_argument("--anchor", default="", help="unsloth: add Unsloth's LoRA r=16 on the same shape and tokens")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeat", type=int, default=1, help="rounds of all rows, interleaved")
    p.add_argument("--workdir", default="runs/trainer_speed", help="the rows' output directories")
    args = p.parse_args(argv)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else []
    # --repeat R interleaves R rounds of every row (and the anchor): on a noisy machine a ratio is taken between
    # neighbours in time, and the spread of the rounds shows the noise.
    for _ in range(args.repeat):
        for name in [r for r in args.rows.split(",") if r]:
            results.append(trainer_row(name, args, Path(args.workdir)))
            print(json.dumps(results[-1])[:700], flush=True)
            out.write_text(json.dumps(results, indent=1))  # after every row: a call cut short keeps what ran
        if args.anchor == "unsloth":
            results.append(unsloth_row(args))
            print(json.dumps(results[-1])[:700], flush=True)
            out.write_text(json.dumps(results, indent=1))
    anchor = next((r["tokens_per_s"] for r in results if r["row"] == "unsloth" and "tokens_per_s" in r), None)
    print(f"{'row':<14}{'tokens/s':>10}{'peak GB':>9}{'x Unsloth':>11}")
    for r in results:
        if "tokens_per_s" in r:
            ratio = f"{r['tokens_per_s'] / anchor:.2f}" if anchor else "-"
            print(f"{r['row']:<14}{r['tokens_per_s']:>10,.0f}{r['peak_gb']:>9.2f}{ratio:>11}")
        else:
            print(f"{r['row']:<14} failed: {r['error']}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
