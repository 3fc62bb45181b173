"""The task metric of a trained cell: greedy generations of every test row, scored, and per-example losses.

Run by a grid worker on the model it has just trained (the engine's module, before the engine is released),
so no cell reloads its base. Generation goes through the project's own path: the prompt text is
msplora_dist.cli.generate.format_prompt's (the training template), the generation settings are those of
generate.generate at --temperature 0 (greedy, eos and pad ids from the tokenizer), batched here with left
padding. The prompt's tokens are exactly what training conditioned the response on: the tokenizer's bos
prepended the way msplora_dist.train.data.tokenize_row does (some tokenizers, SmolLM2's among them, do not add
it themselves), checked against the training row's prompt prefix for every row (`prompt_mismatches` counts
rows where they differ; 0 expected).

Per-example losses use the trainer's own tokenization (tokenize_row) and batching (collate, rows in file
order in micro-batches): their token-weighted mean is the trainer's eval loss on the same split, and the
per-example values let report.py bootstrap over test examples.

Metrics (task/manifest.json's "metric"): "exact_match" (numbers.exact_match) and "chrf" (sacrebleu's
sentence-level chrF, 0..1; the docstring task, whose manifest predates the field, defaults to it).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from experiments.quality import qlib

METRICS = ("exact_match", "chrf")


def metric_of(task_manifest: dict) -> str:
    return task_manifest.get("metric", "chrf")


def score(metric: str, prediction: str, reference: str) -> float:
    if metric == "exact_match":
        from experiments.quality.numbers import exact_match

        return exact_match(prediction, reference)
    if metric == "chrf":
        import sacrebleu

        return sacrebleu.sentence_chrf(prediction.strip(), [reference.strip()]).score / 100.0
    raise ValueError(f"metric {metric!r}: expected one of {METRICS}")


def training_prefix(tokenizer, row: dict) -> list[int]:
    """The tokens of the training row before its first loss token (what the response is conditioned on)."""
    from msplora_dist.train.data import IGNORE_INDEX, tokenize_row

    t = tokenize_row(row, "alpaca", tokenizer, 10**9, False)
    first = next(i for i, label in enumerate(t["labels"]) if label != IGNORE_INDEX)
    return t["input_ids"][:first]


def prompt_ids(tokenizer, row: dict) -> list[int]:
    """generate.format_prompt's ids: the training template, with the one bos training starts a row with."""
    from msplora_dist.cli.generate import format_prompt

    return format_prompt(tokenizer, row["instruction"], input=row.get("input", ""))


@torch.inference_mode()
def greedy_batched(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuations of token-id prompts, batch_size at a time (similar lengths together), left-padded."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, do_sample=False)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, i in enumerate(chunk):
            ids[j, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[j, width - len(prompts[i]):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        for j, i in enumerate(chunk):
            out[i] = tokenizer.decode(gen[j, width:], skip_special_tokens=True)
    return out


@torch.no_grad()
def example_losses(model, tokenizer, rows: list[dict], *, max_seq_len: int, micro_batch_size: int) -> list[tuple[float, int]]:
    """(sum of the response tokens' cross-entropies, number of them) per row, as the trainer's eval computes them."""
    from msplora_dist.train.data import IGNORE_INDEX, collate, tokenize_row

    device = next(model.parameters()).device
    tokenized = [tokenize_row(r, "alpaca", tokenizer, max_seq_len, False) for r in rows]
    out = []
    for start in range(0, len(tokenized), micro_batch_size):
        chunk = tokenized[start:start + micro_batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, tokenizer.pad_token_id).items()}
        labels = batch.pop("labels")
        logits = model(**batch, use_cache=False).logits
        ce = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none")
        for j, t in enumerate(chunk):
            out.append((ce[j].sum().item(), t["num_loss_tokens"]))
    return out


def evaluate_model(model, tokenizer, rows: list[dict], metric: str, *, max_new_tokens: int, batch_size: int, max_seq_len: int,
                   micro_batch_size: int, out_path=None) -> dict:
    """Generate, score and take per-example losses on `rows` (dropout off); write one JSON line per row to
    out_path. Returns what goes into the cell's result.json, the per-example lists included."""
    from msplora_dist.train.backbone import set_eval_mode

    was_training = model.training
    set_eval_mode(model)
    t0 = time.perf_counter()
    try:
        prompts = [prompt_ids(tokenizer, r) for r in rows]
        mismatches = sum(p != training_prefix(tokenizer, r) for p, r in zip(prompts, rows, strict=True))
        predictions = greedy_batched(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
        gen_s = time.perf_counter() - t0
        losses = example_losses(model, tokenizer, rows, max_seq_len=max_seq_len, micro_batch_size=micro_batch_size)
    finally:
        model.train(was_training)
    scores = [score(metric, p, r["output"]) for p, r in zip(predictions, rows, strict=True)]
    if out_path is not None:
        qlib.write_jsonl(out_path, [{"i": i, "prediction": p, "reference": r["output"], "score": s, "loss_sum": ls, "loss_tokens": n}
                                    for i, (p, r, s, (ls, n)) in enumerate(zip(predictions, rows, scores, losses, strict=True))])
    n_tokens = sum(n for _, n in losses)
    return {"metric": metric, "metric_mean": sum(scores) / len(scores), "n": len(rows), "scores": scores,
            "example_loss_sums": [ls for ls, _ in losses], "example_loss_tokens": [n for _, n in losses],
            "loss_from_examples": sum(ls for ls, _ in losses) / n_tokens if n_tokens else None,
            "prompt_mismatches": mismatches, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
            "generation_s": round(gen_s, 2), "eval_s": round(time.perf_counter() - t0, 2)}
