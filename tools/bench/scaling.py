"""The helpers of the multi-GPU scaling runs (docs/scaling.md): a random-weight model directory and long text rows to
train on (also what the benchmark's trainer rows train on), and the comparison and throughput report of runs that
launch/train.py wrote."""

from __future__ import annotations

import json
import math
import random
import shutil
import statistics
from pathlib import Path

import torch

from msplora_dist.utils.fileio import write_file_atomically
from tools.bench.models import SHAPES, build_model, log, param_count

REPO = Path(__file__).resolve().parents[2]
TINY_LLAMA = REPO / "msplora_dist" / "assets" / "tiny_llama"
WORDS_FROM = REPO / "msplora_dist" / "assets" / "data" / "text.jsonl"


def write_model_dir(shape_name: str, device: torch.device, out: Path) -> None:
    """A random bf16 Llama of this shape saved as a Hugging Face directory, with the shipped tiny tokenizer (its ids
    are a subset of any vocabulary: throughput does not depend on which tokens they are)."""
    shape = SHAPES[shape_name]
    model = build_model(shape, device, quantize=False)
    model.config.use_cache = True
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja"):
        if (TINY_LLAMA / name).exists():
            shutil.copy(TINY_LLAMA / name, out / name)
    log(f"saved {param_count(shape):,} parameters of shape {shape_name} to {out}")


def write_text_rows(path: Path, rows: int, min_tokens: int) -> None:
    """Plain-text rows of random words, each longer than min_tokens tokens of the tiny tokenizer."""
    words = sorted({w for line in WORDS_FROM.read_text().splitlines()
                    for w in json.loads(line)["text"].replace(".", " ").split() if w.isalpha()})
    rng = random.Random(0)
    n_words = int(min_tokens / 1.1) + 50  # the tiny tokenizer spends ~1.25 tokens a word
    lines = [json.dumps({"text": " ".join(rng.choice(words) for _ in range(n_words))}) for _ in range(rows)]
    write_file_atomically(path, "\n".join(lines) + "\n")
    log(f"wrote {rows} rows of {n_words} words to {path}")


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
