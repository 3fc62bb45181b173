"""Device minutes of a study's grid, estimated before it runs: counted here, calibrated on a GPU measurement.

    python -m experiments.quality.estimate --model models/smollm2 --tasks runs/smol/docstring:96,runs/smol/numbers:48

A grid cell on one GPU is small work: a training step of SmolLM2 on 32 rows is a few TFLOP, a few
milliseconds of the H200's arithmetic, but thousands of kernels. What sets the pace is the kernels: the 22 M
base's grid, which ran on the H200 four cells at a time (docs/quality.md, its cost table), took 65-84 us per
dispatched operation in each cell, i.e. the GPU (time-sliced between the four processes) got through one kernel
every 16-21 us in all, whatever the arm. So this counts, for every arm on the base's real shape, the FLOPs
(torch.utils.flop_counter.FlopCounterMode) and the kernels (a TorchDispatchMode counting the ATen operations
dispatched, views and metadata operations left out) of a training step (forward, backward, AdamW), of an eval
forward and of a decode step, on a randomly initialised model on the CPU (counted on 16 and 32 tokens and
scaled: the kernels do not depend on the batch's size). A cell is then its kernels x (16-21 us) + its FLOPs /
(100-300 TFLOP/s) + its set-up (shared by the jobs): steps, evaluations every --eval_steps, and for a final cell
greedy generation (one decode step per new token per batch, to the longest answer) and the per-example losses.
The first GPU call measures the truth (result.json's wall_s), and grid.py's deadline logic uses that, not this.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from experiments.quality import qlib
from experiments.quality.arms import Arm, define_arms

# Ops that launch no kernel (views, metadata), left out of the count.
NO_KERNEL = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "as_strided", "unsqueeze", "squeeze", "slice", "select",
             "detach", "alias", "reshape", "_reshape_alias", "split", "split_with_sizes", "unbind", "chunk", "narrow", "view_as",
             "empty", "empty_like", "empty_strided", "lift_fresh", "sym_size", "sym_stride", "sym_numel", "is_same_size",
             "_to_copy_meta", "new_empty", "new_empty_strided", "diagonal", "unfold", "expand_as"}

# The 22 M base's grid on one H200, 4 cells at a time (docs/quality.md, the cost table of 2026-11-29): median trainer
# tokens/s per arm, micro-batch 16 rows of the docstring task (149 tokens on average, unpadded).
CALIBRATION = {"jobs": 4, "rows": 16, "row_tokens": 149, "pad_to": 512,
               "tokens_per_s": {"lora_qv_r64": 29679, "msp_qv_paper": 25992, "msp_qv_eq_lora64": 25021, "lora_qv_eq_paper": 29258,
                                "lora_all_r16": 16278, "msp_all_eq_lora16": 11314}}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] not in NO_KERNEL:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def _model(config: dict, arm: Arm, groups: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from msplora_dist import MSPLoRAConfig, apply_msplora

    keep = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size", "head_dim",
            "vocab_size", "tie_word_embeddings", "rms_norm_eps")
    cfg = LlamaConfig(**{k: config[k] for k in keep if k in config})
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg)
    return apply_msplora(model, MSPLoRAConfig(ranks=arm.ranks, alphas=(16.0,) * 3, target_modules=arm.targets, num_mid_groups=groups,
                                              dropout=0.05))


def _counted(model, opt, rows: int, seq: int, train: bool) -> tuple[int, int]:
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.ones((rows, seq), dtype=torch.long)
    mask = torch.ones_like(ids)
    with FlopCounterMode(display=False) as flops, OpCounter() as ops, torch.set_grad_enabled(train):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        if train:
            torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum").backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return flops.get_total_flops(), ops.ops


def step_counts(config: dict, arm: Arm, rows: int, seq: int, groups: int = 3) -> dict:
    """FLOPs and dispatched kernels of one training step (forward, backward, AdamW) of `rows` x `seq` tokens, of
    a forward alone (an eval micro-batch) and of one decode step, for `arm` on a randomly initialised model of
    `config`'s shape. Counted on 1 x 16 and 1 x 32 tokens on the CPU (the kernels do not depend on the batch's
    size; the FLOPs are a + b s + c s^2 per row, fitted) and scaled to rows x seq."""
    torch.manual_seed(0)
    model = _model(config, arm, groups)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, foreach=True)
    model.train()
    _counted(model, opt, 1, 8, True)  # the first step allocates the optimizer state: not counted
    f16, ops = _counted(model, opt, 1, 16, True)
    f32, _ = _counted(model, opt, 1, 32, True)
    model.eval()
    e16, fwd_ops = _counted(model, None, 1, 16, False)
    e32, _ = _counted(model, None, 1, 32, False)
    _, dec_ops = _counted(model, None, 1, 1, False)

    def scale(x16: int, x32: int) -> float:  # per row: linear in s plus the attention's s^2 (its share is small)
        quad = max(0.0, (x32 - 2 * x16) / (32 * 32 - 2 * 16 * 16))
        lin = (x16 - quad * 16 * 16) / 16
        return rows * (lin * seq + quad * seq * seq)

    return {"step_flops": scale(f16, f32), "step_ops": ops, "fwd_flops": scale(e16, e32), "fwd_ops": fwd_ops, "decode_ops": dec_ops,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def seconds_per_op(calib_config: dict, groups: int = 3) -> dict[str, float]:
    """Per arm of the 22 M grid: measured step time / counted kernels (the GPU cost of one dispatched op there)."""
    from msplora_dist.train.backbone import projection_features

    c = CALIBRATION
    out = {}
    for arm in define_arms(projection_features(calib_config), calib_config["num_hidden_layers"], groups):
        if arm.name in c["tokens_per_s"]:
            step_s = c["rows"] * c["row_tokens"] / c["tokens_per_s"][arm.name]
            out[arm.name] = step_s / step_counts(calib_config, arm, c["rows"], 64, groups)["step_ops"]
    return out


def task_shape(root: Path, tokenizer) -> dict:
    """Rows, token lengths and the longest response of a study root's task splits (as the trainer tokenizes them)."""
    from msplora_dist.train.data import tokenize_row

    out = {}
    for split in ("train", "dev", "test"):
        rows = qlib.read_jsonl(root / "task" / f"{split}.jsonl")
        lens = [tokenize_row(r, "alpaca", tokenizer, 10**9, False) for r in rows]
        out[split] = {"rows": len(rows), "mean": statistics.mean(len(t["input_ids"]) for t in lens),
                      "loss_max": max(t["num_loss_tokens"] for t in lens)}
    return out


def cell_cost(c: dict, shape: dict, phase: str, args, gen_tokens: int) -> tuple[float, float]:
    """(kernels, FLOPs) of one cell: its steps, its evaluations and, for a final cell, generation + per-example losses."""
    split = "dev" if phase == "lr" else "test"
    eval_batches = math.ceil(shape[split]["rows"] / args.micro_batch_size)
    n_evals = args.steps // args.eval_steps + 1
    kernels = args.steps * c["step_ops"] + n_evals * eval_batches * c["fwd_ops"]
    flops = args.steps * c["step_flops"] + n_evals * eval_batches * c["fwd_flops"]
    if phase == "final" and gen_tokens:
        # every batch decodes until its longest answer ends (or the cap): take the task's longest answer
        new = min(gen_tokens, shape["test"]["loss_max"] + 2)
        kernels += math.ceil(shape["test"]["rows"] / args.gen_batch_size) * new * c["decode_ops"] + eval_batches * c["fwd_ops"]
        flops += 2 * c["fwd_flops"] * eval_batches  # prefill and the per-example losses, about two forwards of the split
    return kernels, flops


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="the base (its config and tokenizer)")
    p.add_argument("--tasks", required=True, help="ROOT:GEN_TOKENS[:ARM+ARM...],...: study roots (task/ each), their "
                   "--gen_max_new_tokens and, optionally, the arms run there (default: all)")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--micro_batch_size", type=int, default=32)
    p.add_argument("--eval_steps", type=int, default=40)
    p.add_argument("--lr_cells", type=int, default=3, help="learning-rate cells per arm (a widening adds one)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--gen_batch_size", type=int, default=128)
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--setup_s", default="6,12", help="per cell, low,high: model load and engine set-up in a warm worker "
                   "(CPU work: the jobs overlap it)")
    p.add_argument("--tflops", default="100,300", help="low,high: the GPU's bf16 rate on these small matrices")
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    from experiments.quality.grid import base_config
    from msplora_dist.train.backbone import projection_features

    torch.set_num_threads(1)
    setup = [float(x) for x in args.setup_s.split(",")]
    rate = [float(x) * 1e12 for x in args.tflops.split(",")]
    config = base_config(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    per_op = seconds_per_op(dict(qlib.MODEL_PRESETS["base"], vocab_size=8192, tie_word_embeddings=True))
    kernel_s = [min(per_op.values()) / CALIBRATION["jobs"], max(per_op.values()) / CALIBRATION["jobs"]]
    print(f"calibration (22 M grid on the H200, {CALIBRATION['jobs']} cells at a time): seconds per dispatched op and cell "
          + ", ".join(f"{k} {v * 1e6:.1f} us" for k, v in per_op.items())
          + f"; the GPU ran {1 / kernel_s[1]:,.0f}-{1 / kernel_s[0]:,.0f} kernels/s in all")
    arms = define_arms(projection_features(config), config["num_hidden_layers"])
    report = {"per_op_s": per_op, "kernel_s": kernel_s, "tasks": {}}
    total = [0.0, 0.0]
    for item in (x for x in args.tasks.split(",") if x):
        root, _, rest = item.partition(":")
        gen, _, only = rest.partition(":")
        root, gen_tokens = Path(root), int(gen or 0)
        task_arms = [a for a in arms if not only or a.name in only.split("+")]
        shape = task_shape(root, tokenizer)
        seq = min(512, int(1.6 * shape["train"]["mean"]))  # a micro-batch pads to its longest row: ~1.6x the mean here
        task = report["tasks"][root.name] = {"shape": shape, "seq": seq, "arms": {}, "minutes": [0.0, 0.0]}
        for arm in task_arms:
            c = step_counts(config, arm, args.micro_batch_size, seq)
            cells = {"lr": args.lr_cells, "final": args.seeds}
            arm_s = [0.0, 0.0]
            for phase, n in cells.items():
                kernels, flops = cell_cost(c, shape, phase, args, gen_tokens)
                for k in (0, 1):
                    arm_s[k] += n * (kernels * kernel_s[k] + flops / rate[1 - k] + setup[k] / args.jobs)
            task["arms"][arm.name] = dict(c, seconds=arm_s)
            for k in (0, 1):
                task["minutes"][k] += arm_s[k] / 60
            print(f"{root.name:>10} {arm.name:<18} step {c['step_flops'] / 1e12:5.2f} TFLOP, {c['step_ops']:>6} kernels; decode step "
                  f"{c['decode_ops']} kernels; its {sum(cells.values())} cells {arm_s[0] / 60:4.1f}-{arm_s[1] / 60:4.1f} min")
        print(f"{root.name:>10} all arms: {task['minutes'][0]:.1f}-{task['minutes'][1]:.1f} device minutes")
        total = [total[k] + task["minutes"][k] for k in (0, 1)]
    print(f"grid: {total[0]:.1f}-{total[1]:.1f} device minutes ({args.lr_cells} lr + {args.seeds} seeds cells per arm and task, "
          f"{args.steps} steps of {args.micro_batch_size} rows, {args.jobs} cells at a time)")
    report["total_min"] = total
    return report


if __name__ == "__main__":
    main()
