"""Regenerate the "embedded default" assets shipped in ``msplora_dist/assets/``.

Run from the repository root (CPU only, offline, about a minute: the base model is pretrained on one thread)::

    python -m tools.make_default_assets                      # rewrites msplora_dist/assets/
    python -m tools.make_default_assets --out /tmp/assets    # elsewhere, e.g. to compare with sha256sum

It writes, deterministically (same bytes on every run with the same library
versions; check with ``sha256sum``):

* ``msplora_dist/assets/data/instructions.jsonl``: alpaca-style rows
  ``{"instruction", "input", "output"}`` built from small templates and tables
  (tools/default_data.py).
* ``msplora_dist/assets/data/chat.jsonl``: ``{"messages": [...]}`` rows.
* ``msplora_dist/assets/data/text.jsonl``: ``{"text": ...}`` rows.
* ``msplora_dist/assets/tiny_llama/``: a SentencePiece (BPE, byte fallback)
  tokenizer trained on that data, exported as a transformers ``LlamaTokenizer``
  (tools/sentencepiece_bpe.py), plus a 4-layer grouped-query ``LlamaForCausalLM`` (head_dim 32) pretrained
  on the tasks in a ``Q:``/``A:`` form (see ``pretrain``).

Everything is seeded; nothing is downloaded. The tokenizer corpus is cut up
the way ``msplora_dist.train.data`` tokenizes rows (``msplora_dist.train.prompts`` supplies
the Alpaca prompt), so rerun this after changing either. Before replacing the
model directory, the script checks that it reloads through the Auto* classes
with ``HF_HUB_OFFLINE=1``, that the transformers tokenizer agrees with the raw
SentencePiece model, and that the chat template renders prefix by prefix.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

# Must be set before transformers is imported: the assets must never touch the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import sentencepiece as spm
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from msplora_dist.train.prompts import alpaca_prompt
from msplora_dist.train.schedule import warmup_cosine
from tools.default_data import TASKS, _user_text, build_datasets
from tools.sentencepiece_bpe import build_tokenizer, check_tokenizer, train_sentencepiece

SEED = 1234
VOCAB_SIZE = 768

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS_DIR = REPO_ROOT / "msplora_dist" / "assets"


# ------------------------------------------------------------------------ tokenizer


def tokenizer_corpus(instructions: list[dict], chat: list[dict], text: list[dict]) -> list[str]:
    """Lines the tokenizer is trained on: the data cut up as the trainer tokenizes it.

    msplora_dist.train.data tokenizes each row as separate segments (alpaca: prompt, then
    output; chat: text before each reply, then the reply), and the LLaMA tokenizer
    puts its "▁" dummy prefix only at the start of each tokenized text, never after
    a newline or after a special token such as the template's leading ``<s>``.
    SentencePiece trains on single lines, so we train with ``add_dummy_prefix=False``
    and add the leading space by hand exactly where it will appear at run time;
    the learned pieces then match real use ("###" opening the prompt is "▁###",
    while "Sort" after "### Instruction:\n" has no "▁"). Newlines are left to
    byte fallback (``<0x0A>``), and special tokens never reach the trainer.
    """
    segments: list[tuple[str, bool]] = []  # (text, starts with the dummy prefix)
    for r in instructions:
        segments += [(alpaca_prompt(r["instruction"], r["input"]), True), (r["output"], True)]
    for r in chat:
        # sentencepiece_bpe.CHAT_TEMPLATE renders "<s>User: ...\nAssistant: " + reply + "</s>\n" per turn pair.
        for i, m in enumerate(r["messages"]):
            if m["role"] == "user":
                segments.append((f"User: {m['content']}\nAssistant: ", i > 0))  # after "<s>" on the first turn
            else:
                segments.append((m["content"], True))
    segments.extend((r["text"], True) for r in text)

    lines = []
    for seg, prefixed in segments:
        for i, line in enumerate(seg.split("\n")):
            if line.strip():
                lines.append(" " + line if prefixed and i == 0 else line)
    return lines


def check_chat_template(tok, chat: list[dict]) -> None:
    """The template must render every conversation prefix as a prefix of the whole.

    msplora_dist.train.data relies on that to find the reply tokens that take the loss.
    """
    for row in chat:
        messages, rendered = row["messages"], ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            through = tok.apply_chat_template(messages[: i + 1], tokenize=False)
            if not (before.startswith(rendered) and through.startswith(before) and through.endswith(tok.eos_token + "\n")):
                raise AssertionError(f"chat template does not render {messages} prefix by prefix")
            rendered = through
    ids = tok.apply_chat_template(chat[0]["messages"], tokenize=True, return_dict=True)["input_ids"]
    if ids[0] != tok.bos_token_id or tok.eos_token_id not in ids:
        raise AssertionError(f"chat template output unexpected: {ids}")


# ---------------------------------------------------------------------------- model


# The shape: vLLM's CPU attention kernels take head_dim in {32, 64, 80, 96, 112, 128, ...}, so two heads of
# 32 rather than four of 16 (same projection shapes, same parameter count, same training speed), with one
# key/value head: grouped-query attention on purpose (LoRA on k/v must cope with narrower projections).
HIDDEN_SIZE = 64
INTERMEDIATE_SIZE = 172
NUM_LAYERS = 4
NUM_HEADS = 2
NUM_KV_HEADS = 1
# The base is pretrained (all weights, plain PyTorch) on the tasks of the shipped data written as
# "Q: ...\nA: ..." documents, so it knows the facts (capitals, plurals, colours, ...) but not the Alpaca
# template the default run trains on: the adapter has something to learn (eval loss about 4.1 -> 0.9) and
# the first thing a user samples after the default run is right. A random base learns next to nothing
# from adapters alone in a minute (eval loss 7.6 -> 3.6, no answer right).
PRETRAIN_DOCS = 6000
PRETRAIN_STEPS = 800
PRETRAIN_BATCH = 32
PRETRAIN_LR = 3e-3
PRETRAIN_WARMUP = 50


def pretrain_documents(seed: int) -> list[str]:
    """The pretraining corpus: task rows drawn afresh (their own seed), in a format the default run never uses."""
    rng = random.Random(seed + 1)
    docs = []
    for _ in range(PRETRAIN_DOCS):
        ins, inp, out = TASKS[rng.randrange(len(TASKS))](rng)
        docs.append(f"Q: {_user_text(ins, inp)}\nA: {out}")
    return docs


def pretrain(model: LlamaForCausalLM, tok, seed: int) -> list[float]:
    """Full-weight causal-LM training on pretrain_documents: AdamW, the trainer's warmup + cosine to 10% (schedule.py).
    One thread, so the weights are the same bytes on every run (threaded CPU reductions are not)."""
    import torch.nn.functional as F

    docs = [tok(d)["input_ids"] + [tok.eos_token_id] for d in pretrain_documents(seed)]
    rng = random.Random(seed + 2)
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, betas=(0.9, 0.95), weight_decay=0.1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    losses = []
    model.train()
    try:
        for step in range(PRETRAIN_STEPS):
            for group in opt.param_groups:
                group["lr"] = PRETRAIN_LR * warmup_cosine(step, PRETRAIN_STEPS, PRETRAIN_WARMUP, 0.1)
            batch = [docs[rng.randrange(len(docs))] for _ in range(PRETRAIN_BATCH)]
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), tok.pad_token_id)
            labels = torch.full((len(batch), width), -100)
            for i, doc in enumerate(batch):
                ids[i, : len(doc)] = labels[i, : len(doc)] = torch.tensor(doc)
            logits = model(input_ids=ids, attention_mask=(labels != -100).long()).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            if step % 200 == 0 or step == PRETRAIN_STEPS - 1:
                print(f"pretrain step {step + 1}/{PRETRAIN_STEPS}: loss {loss.item():.3f}", flush=True)
    finally:
        torch.set_num_threads(threads)
    return losses


def build_model(vocab_size: int, tok, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HIDDEN_SIZE // NUM_HEADS,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=False,  # separate lm_head so adapters on it are testable
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    losses = pretrain(model, tok, seed)
    if not losses[-1] < 0.25 * losses[0]:
        raise AssertionError(f"pretraining did not converge: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return model.eval()


# ----------------------------------------------------------------------------- main


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ASSETS_DIR, help="assets directory to (re)write")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()

    data_dir = args.out / "data"
    model_dir = args.out / "tiny_llama"

    instructions, chat, text = build_datasets(args.seed)
    write_jsonl(data_dir / "instructions.jsonl", instructions)
    write_jsonl(data_dir / "chat.jsonl", chat)
    write_jsonl(data_dir / "text.jsonl", text)

    # Build in a scratch dir and swap in at the end, so a failed check never
    # leaves a half-written model directory behind and stale files never linger.
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        spm_path = tmp_dir / "tokenizer.model"
        spm_path.write_bytes(train_sentencepiece(tokenizer_corpus(instructions, chat, text), VOCAB_SIZE, args.seed))
        sp = spm.SentencePieceProcessor(model_file=str(spm_path))

        tok = build_tokenizer(spm_path)
        samples = (
            [alpaca_prompt(r["instruction"], r["input"]) + r["output"] for r in instructions]
            + [r["output"] for r in instructions]
            + [r["text"] for r in text]
            + ["Hello,  world!\n\tTabs, émojis 🙂 and 中文 fall back to bytes.", "x"]
        )
        # Not checked: text starting with a space. The tokenizers Metaspace
        # pre-tokenizer skips the dummy prefix when one is already there, while
        # SentencePiece adds a second one; same known quirk as the LLaMA hub tokenizers.
        check_tokenizer(tok, sp, samples)

        staged = tmp_dir / "tiny_llama"
        tok.save_pretrained(staged)
        model = build_model(len(tok), tok, args.seed)
        model.save_pretrained(staged, safe_serialization=True)

        # Reload exactly as a user would, offline, through the Auto classes.
        tok2 = AutoTokenizer.from_pretrained(staged)
        check_tokenizer(tok2, sp, samples)
        check_chat_template(tok2, chat)
        model2 = AutoModelForCausalLM.from_pretrained(staged)
        batch = tok2(["Reverse the word.\napple"], return_tensors="pt")
        with torch.no_grad():
            logits = model2(**batch).logits
        if logits.shape[-1] != len(tok2) or not torch.isfinite(logits).all():
            raise AssertionError(f"bad logits {tuple(logits.shape)}")

        # Ship the SentencePiece model too (for sentencepiece/llama.cpp-style tooling);
        # transformers still prefers tokenizer.json when both are present.
        shutil.copyfile(spm_path, staged / "tokenizer.model")
        tok3 = AutoTokenizer.from_pretrained(staged)
        check_tokenizer(tok3, sp, samples)

        if model_dir.exists():
            shutil.rmtree(model_dir)
        shutil.copytree(staged, model_dir, copy_function=shutil.copyfile)  # plain 0644 files, not tempdir modes

    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {len(instructions)} instruction / {len(chat)} chat / {len(text)} text rows to {data_dir}")
    print(f"wrote tokenizer (vocab {len(tok)}) and model ({n_params:,} params) to {model_dir}")


if __name__ == "__main__":
    main()
