"""Pretrain the quality test's base model: a LLaMA-architecture causal LM on the pretraining modules only.

Run after prepare.py, on the same root (reads corpus/pretrain.jsonl, corpus/pretrain_val.jsonl, tokenizer/):

    python -m experiments.quality.pretrain --root runs/quality --tokens 100M          # one H200: ~1-3 min (docs/quality.md)
    python -m experiments.quality.pretrain --root runs/quality --time_budget_s 300    # as many tokens as fit in 300 s
    python -m experiments.quality.pretrain --root runs/quality-smoke --preset smoke --tokens 300K --batch_size 8 --seq_len 128

Plain PyTorch around transformers' LlamaForCausalLM (so the result is an ordinary HF model directory): files
are tokenized as <s> text </s>, concatenated in path order and cut into non-overlapping rows of seq_len + 1
tokens ("packed", no masking across documents); every epoch visits the rows in a seeded permutation. AdamW
(0.9, 0.95), weight decay 0.1 on matrices, linear warmup then cosine to 10%, gradient clipping 1.0; on a GPU
bf16 autocast over fp32 weights, sdpa attention, TF32, torch.compile (falls back to eager if compiling fails).

The budget is --tokens (fixed, reproducible), or --time_budget_s: the step time is measured over steps
20-60 (inside the warmup, so the schedule so far does not depend on it) and the number of steps fixed from it;
the log records the resulting token count, which --tokens then reproduces. --max_train_s is a hard stop
(the model so far is saved and the log says so). The validation loss on corpus/pretrain_val.jsonl is taken
every --eval_every steps; the weights with the best one are saved (early stopping: the corpus is small, so
a long budget means many epochs).

Writes --root/base: config.json, model.safetensors (--save_dtype, bf16 by default: 44 MB for the "base"
preset), generation_config.json, the tokenizer files, and pretrain_log.json (budget, tokens, epochs, loss
curves, tokens/s, model FLOPs and MFU against 790 TFLOP/s, environment). The directory is checked to reload
through AutoModelForCausalLM offline with the same logits before it replaces an earlier one.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from experiments.quality import qlib

qlib.offline_env()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from msplora_dist.train.schedule import warmup_cosine  # noqa: E402

CALIBRATE = (20, 60)  # steps over which --time_budget_s measures the step time
MIN_LR_RATIO = 0.1  # the cosine ends at 10% of the peak


# --- model and data -----------------------------------------------------------------------------------------

def build_config(preset: str, tokenizer, max_positions: int = 1024, **overrides):
    from transformers import LlamaConfig

    shape = dict(qlib.MODEL_PRESETS[preset], **overrides)
    return LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=max_positions, rms_norm_eps=1e-5,
                       initializer_range=0.02, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)


def encode_documents(texts: list[str], tokenizer, batch: int = 64) -> np.ndarray:
    """<s> ids </s> per document, concatenated (uint16 when the vocabulary allows)."""
    dtype = np.uint16 if len(tokenizer) <= 65535 else np.uint32
    parts = []
    for i in range(0, len(texts), batch):
        for ids in tokenizer(texts[i:i + batch], add_special_tokens=False)["input_ids"]:
            parts.append(np.asarray([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id], dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def make_rows(stream: np.ndarray, seq_len: int) -> torch.Tensor:
    """Non-overlapping rows of seq_len + 1 tokens (inputs and shifted targets); the tail is dropped."""
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise SystemExit(f"error: {len(stream)} tokens make no row of {seq_len + 1}; expected more text or a smaller --seq_len")
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(stream[idx].astype(np.int64))


class RowSampler:
    """Batches of row indices: epoch e is a permutation seeded by (seed, e); incomplete batches dropped."""

    def __init__(self, num_rows: int, batch_size: int, seed: int):
        if num_rows < batch_size:
            raise SystemExit(f"error: {num_rows} rows are fewer than one batch of {batch_size}; expected a smaller --batch_size")
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self.steps_per_epoch = num_rows // batch_size
        self._epoch, self._perm = None, None

    def batch(self, step: int) -> torch.Tensor:
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._perm = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed * 1000003 + epoch))
            self._epoch = epoch
        return self._perm[k * self.batch_size:(k + 1) * self.batch_size]


def flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (matrix parameters, lm_head included, embeddings not) + causal attention
    (QK^T and AV: 2 * seq_len * hidden per layer forward, x3 with backward). The usual 'model FLOPs'."""
    h, L, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    per_layer = h * config.num_attention_heads * head_dim * 2 + h * kv * 2 + 3 * h * inter
    matrix = L * per_layer + h * config.vocab_size
    return 6 * matrix + 6 * L * seq_len * h


def count_parameters(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# --- training -----------------------------------------------------------------------------------------------

def loss_on(model, rows: torch.Tensor, device, autocast: bool) -> torch.Tensor:
    rows = rows.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=rows[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())


def train_step(step_fn, opt, rows: torch.Tensor, device, autocast: bool) -> torch.Tensor:
    """Forward, backward, clip to norm 1, AdamW step (gradients cleared first, also after a failed try)."""
    opt.zero_grad(set_to_none=True)
    loss = loss_on(step_fn, rows, device, autocast)
    loss.backward()
    params = [p for group in opt.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.detach()


@torch.no_grad()
def evaluate(model, rows: torch.Tensor, batch_size: int, device, autocast: bool) -> float:
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        total += loss_on(model, chunk, device, autocast).item() * len(chunk)
        n += len(chunk)
    model.train()
    return total / max(1, n)


def make_optimizer(model, lr: float, weight_decay: float, device) -> torch.optim.Optimizer:
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    kwargs = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8, **kwargs)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def train(model, train_rows: torch.Tensor, val_rows: torch.Tensor, args, device, log) -> dict:
    """The loop; returns the run record (the best-validation weights are in record['best_state'])."""
    autocast = device.type == "cuda"
    tokens_per_step = args.batch_size * args.seq_len
    planned = max(1, math.ceil(args.tokens / tokens_per_step)) if args.tokens else None
    total = planned or 10**9  # with --time_budget_s, fixed after calibration
    # With --time_budget_s the warmup outlasts the calibration, so no step before it depends on the total.
    warmup = min(args.warmup_steps, max(1, planned // 10)) if planned else max(args.warmup_steps, CALIBRATE[1])
    sampler = RowSampler(len(train_rows), args.batch_size, args.seed)
    opt = make_optimizer(model, args.lr, args.weight_decay, device)
    step_fn = torch.compile(model) if args.compile else model
    rec = {"planned_steps": planned, "warmup_steps": warmup, "tokens_per_step": tokens_per_step, "train_log": [], "val_log": [],
           "compiled": bool(args.compile), "stopped_early": None}
    best = (float("inf"), -1, None)
    t_start = time.perf_counter()
    t_window, calib_t0 = t_start, None
    step = 0
    model.train()
    while step < total:
        for group in opt.param_groups:
            group["lr"] = args.lr * warmup_cosine(step, total, warmup, MIN_LR_RATIO)
        rows = train_rows[sampler.batch(step)]
        try:
            loss = train_step(step_fn, opt, rows, device, autocast)
        except Exception as err:  # torch.compile failing on this machine (forward or backward): eager, once
            if step_fn is model or step > 0:
                raise
            log(f"torch.compile failed ({type(err).__name__}: {str(err)[:300]}); continuing in eager mode")
            step_fn, rec["compiled"] = model, False
            loss = train_step(step_fn, opt, rows, device, autocast)
        step += 1
        if args.time_budget_s and step == CALIBRATE[0]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            calib_t0 = time.perf_counter()
        if args.time_budget_s and step == CALIBRATE[1]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            s_per_step = (now - calib_t0) / (CALIBRATE[1] - CALIBRATE[0])
            # Evaluations cost about one step per val batch each; leave them room.
            n_evals = 1 + max(1, int(args.time_budget_s / max(1e-9, s_per_step)) // args.eval_every)
            eval_cost = n_evals * math.ceil(len(val_rows) / args.batch_size) * s_per_step * 0.5
            left = args.time_budget_s - (now - t_start) - eval_cost
            total = max(step + 1, step + int(left / s_per_step))
            warmup = min(warmup, max(CALIBRATE[1], total // 10))  # a short budget still decays
            rec["warmup_steps"] = warmup
            rec["calibrated_s_per_step"] = s_per_step
            log(f"calibrated: {s_per_step * 1e3:.1f} ms/step, {tokens_per_step / s_per_step:,.0f} tokens/s -> {total} steps "
                f"({total * tokens_per_step / 1e6:.1f} M tokens)")
        last = step == total
        if step % args.log_every == 0 or last:
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            n_steps = args.log_every if step % args.log_every == 0 else step % args.log_every
            entry = {"step": step, "loss": round(loss.item(), 4), "lr": opt.param_groups[0]["lr"],
                     "tokens_per_s": round(n_steps * tokens_per_step / max(1e-9, now - t_window)), "elapsed_s": round(now - t_start, 1)}
            rec["train_log"].append(entry)
            log(f"step {step}/{total if total < 10**9 else '?'}  loss {entry['loss']:.4f}  lr {entry['lr']:.2e}  "
                f"{entry['tokens_per_s']:,} tok/s  {entry['elapsed_s']:.0f} s")
            t_window = time.perf_counter()
        over_time = bool(args.max_train_s) and time.perf_counter() - t_start > args.max_train_s
        if step % args.eval_every == 0 or last or over_time:
            val = evaluate(model, val_rows, args.batch_size, device, autocast)
            rec["val_log"].append({"step": step, "val_loss": round(val, 4), "elapsed_s": round(time.perf_counter() - t_start, 1)})
            log(f"step {step}  val_loss {val:.4f}")
            if val < best[0]:
                best = (val, step, snapshot(model))
            t_window = time.perf_counter()
        if over_time and not last:
            rec["stopped_early"] = f"--max_train_s {args.max_train_s} reached at step {step} of {total}"
            log(rec["stopped_early"])
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    rec.update(steps=step, total_steps=total, tokens=step * tokens_per_step, train_s=round(time.perf_counter() - t_start, 2),
               best_val_loss=round(best[0], 4), best_step=best[1], best_state=best[2])
    return rec


# --- saving -------------------------------------------------------------------------------------------------

def save_base(model, state: dict, tokenizer_dir: Path, out: Path, dtype: torch.dtype, log_record: dict) -> None:
    """Write the model (best weights, in dtype) + tokenizer + log into a staging dir, check it reloads
    offline with the same logits, then replace `out`."""
    from transformers import AutoModelForCausalLM

    rounded = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(rounded)
    model = model.to("cpu", dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        staged = Path(tmp) / "base"
        model.config.dtype = str(dtype).removeprefix("torch.")
        model.save_pretrained(staged, safe_serialization=True)
        for f in tokenizer_dir.iterdir():
            if f.is_file():
                shutil.copyfile(f, staged / f.name)
        # Compare in fp32 against a fresh model holding the saved (rounded) values, so neither bf16 kernels
        # nor the rotary buffers that .to(bf16) rounds in memory (they are not saved) count as differences.
        ref = type(model)._from_config(model.config, dtype=torch.float32).eval()
        ref.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in rounded.items()})
        probe = torch.arange(1, 33).remainder(model.config.vocab_size)[None]
        with torch.no_grad():
            want = ref(input_ids=probe).logits
            again = AutoModelForCausalLM.from_pretrained(staged, dtype=torch.float32).eval()
            got = again(input_ids=probe).logits
        if not torch.allclose(want, got, atol=1e-4, rtol=1e-4):
            raise AssertionError(f"the saved model does not reproduce its logits (max diff {(want - got).abs().max():.3g})")
        qlib.write_json(staged / "pretrain_log.json", log_record)
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(staged, out, copy_function=shutil.copyfile)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=qlib.DEFAULT_ROOT, help="experiment root (reads corpus/, tokenizer/; writes base/)")
    p.add_argument("--out", type=Path, default=None, help="model directory (default: ROOT/base)")
    p.add_argument("--preset", default="base", choices=sorted(qlib.MODEL_PRESETS))
    p.add_argument("--tokens", default="100M", help="training tokens (K/M/G suffixes); 0 with --time_budget_s")
    p.add_argument("--time_budget_s", type=float, default=0, help="instead of --tokens: fit the run into this many seconds")
    p.add_argument("--max_train_s", type=float, default=0, help="hard stop after this many seconds of training (0: none)")
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=128, help="rows of seq_len tokens per step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--warmup_steps", type=int, default=150)
    p.add_argument("--eval_every", type=int, default=200)
    p.add_argument("--log_every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", default="auto", choices=("auto", "true", "false"), help="torch.compile (auto: on a GPU)")
    p.add_argument("--save_dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    args = p.parse_args(argv)
    args.tokens = 0 if args.time_budget_s else qlib.parse_count(args.tokens)
    if not args.tokens and not args.time_budget_s:
        p.error("expected --tokens > 0 or --time_budget_s > 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from transformers import AutoTokenizer, LlamaForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda") if on_gpu else torch.device("cpu")
    args.compile = {"auto": on_gpu, "true": True, "false": False}[args.compile]
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[pretrain {time.perf_counter() - t0:6.1f} s] {msg}", flush=True)

    tokenizer = AutoTokenizer.from_pretrained(args.root / "tokenizer")
    tokenizer.model_max_length = 10**9
    corpus = {role: qlib.read_jsonl(args.root / "corpus" / f"{role}.jsonl") for role in ("pretrain", "pretrain_val")}
    streams = {role: encode_documents([r["text"] for r in recs], tokenizer) for role, recs in corpus.items()}
    # The whole corpus fits on the device (7.7 M tokens are 62 MB as int64): no copy per step.
    train_rows = make_rows(streams["pretrain"], args.seq_len).to(device)
    val_rows = make_rows(streams["pretrain_val"], args.seq_len).to(device)
    t_tok = time.perf_counter() - t0
    log(f"tokenized: pretrain {len(streams['pretrain']):,} tokens ({len(train_rows)} rows), val {len(streams['pretrain_val']):,} "
        f"tokens ({len(val_rows)} rows) in {t_tok:.1f} s")

    config = build_config(args.preset, tokenizer, max_positions=max(1024, args.seq_len))
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32).to(device)
    n_params = count_parameters(model)
    fpt = flops_per_token(config, args.seq_len)
    log(f"model: {n_params / 1e6:.2f} M parameters ({args.preset}), {fpt / 1e6:.0f} MFLOP per training token; device {device}")

    rec = train(model, train_rows, val_rows, args, device, log)
    best_state = rec.pop("best_state")
    steady = [e["tokens_per_s"] for e in rec["train_log"][2:]] or [e["tokens_per_s"] for e in rec["train_log"]]
    tok_s = float(np.median(steady)) if steady else 0.0
    manifest = qlib.read_json(args.root / "corpus" / "manifest.json")
    record = {
        "args": {k: str(v) for k, v in vars(args).items()}, "preset": args.preset, "config": config.to_dict(),
        "parameters": n_params, "flops_per_token": fpt, "corpus_sha256": manifest["corpus_sha256"],
        "corpus_stdlib_python": manifest.get("stdlib_python") or manifest["python"], "corpus_read_by_python": manifest["python"],
        "pretrain_tokens_per_epoch": len(streams["pretrain"]),
        "val_tokens": len(streams["pretrain_val"]), "epochs": round(rec["tokens"] / max(1, len(streams["pretrain"])), 2),
        "median_tokens_per_s": round(tok_s), "mfu_vs_790tflops": round(tok_s * fpt / qlib.H200_BF16_FLOPS, 4) if on_gpu else None,
        "tokenize_s": round(t_tok, 2), **rec, "env": qlib.env_info(),
    }
    out = args.out or args.root / "base"
    save_base(model, best_state, args.root / "tokenizer", out, torch.bfloat16 if args.save_dtype == "bf16" else torch.float32, record)
    record["total_s"] = round(time.perf_counter() - t0, 2)
    qlib.write_json(out / "pretrain_log.json", record)
    log(f"saved {out} (best val_loss {record['best_val_loss']} at step {record['best_step']} of {record['steps']}; "
        f"{record['tokens'] / 1e6:.1f} M tokens = {record['epochs']} epochs; median {tok_s:,.0f} tok/s"
        + (f", MFU {record['mfu_vs_790tflops']:.1%}" if on_gpu else "") + ")")
    return record


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    main()
