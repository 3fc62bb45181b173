"""Data: tokenize rows (read by msplora_dist.train.rows) with loss masks, and sample global batches.

Every tokenized example carries input_ids, labels (-100 where no loss is taken) and num_loss_tokens.
The first token (bos) never carries a loss, so the shifted cross-entropy sees exactly num_loss_tokens
targets; the trainer divides by the global batch's total, which every rank can compute on its own.

Sampling (GlobalBatchSampler) depends only on (seed, epoch, global batch size): the global batch of
step k holds the same examples whatever the split into ranks x micro-batches x accumulation steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from jinja2 import TemplateError

from msplora_dist.errors import DataError, RowError
from msplora_dist.train.prompts import alpaca_prompt, check_turns, ensure_chat_template, leading_bos, sharegpt_messages
from msplora_dist.train.rows import row_namer

IGNORE_INDEX = -100
CHAT_FORMATS = ("chat", "sharegpt")  # rendered by the chat template


# --- tokenizing ---------------------------------------------------------------------------------------

def _segments(row: dict, fmt: str, tokenizer, field: str = "messages") -> list[tuple[str, bool]]:
    """The row as (text, takes_loss) segments, in order. Raises RowError."""
    if fmt == "alpaca":
        instruction, output = row.get("instruction"), row.get("output")
        if not isinstance(instruction, str) or not isinstance(output, str):
            raise RowError("'instruction' and 'output' must be strings, got "
                           f"{type(instruction).__name__} and {type(output).__name__}")
        input_text = row.get("input") or ""
        if not isinstance(input_text, str):
            raise RowError(f"'input' must be a string (or absent), got {type(input_text).__name__}")
        return [(alpaca_prompt(instruction, input_text), False), (output, True)]
    if fmt == "text":
        if not isinstance(row.get("text"), str):
            raise RowError(f"'text' must be a string, got {type(row.get('text')).__name__}")
        return [(row["text"], True)]
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
        raise RowError(f"'{field}' must be a non-empty list of {{role, content}} strings")
    check_turns(messages, field)

    def render(prefix: list[dict], generation_prompt: bool = False) -> str:
        try:
            return tokenizer.apply_chat_template(prefix, tokenize=False, add_generation_prompt=generation_prompt)
        except TemplateError as err:  # templates raise on roles or orders they do not support
            raise RowError(f"the tokenizer's chat template refused the conversation: {err}") from None

    # Render growing prefixes: the text added by each assistant turn takes the loss. This works for any
    # template that renders a conversation's prefix as a prefix of the whole.
    segments, rendered = [], ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            through = render(messages[: i + 1])
            before = render(messages[:i], generation_prompt=True) if i else _opening_header(render)
            if not before.startswith(rendered) or not through.startswith(before):
                raise RowError("the tokenizer's chat template does not render conversations prefix by prefix")
            segments += [(before[len(rendered):], False), (through[len(before):], True)]
            rendered = through
    full = render(messages)
    if full[len(rendered):]:
        segments.append((full[len(rendered):], False))
    return [s for s in segments if s[0]]


def _opening_header(render) -> str:
    """What the template writes before the content of a conversation's opening assistant turn (the part that
    takes no loss): rendered around a marker no real content contains, since templates may trim content."""
    marker = "\x00MSPLORA-CONTENT\x00"
    text = render([{"role": "assistant", "content": marker}])
    if marker not in text:
        raise RowError("the tokenizer's chat template does not write an opening assistant turn's content as given")
    return text[:text.index(marker)]


def _loss_mask(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Token ids of `text` and, per token, whether it reaches into one of the character spans.

    The text is tokenized whole, as it is at inference: tokenizing each segment alone would start every
    segment with a word-start marker ("▁" in SentencePiece) that the running text does not have.
    """
    if tokenizer.is_fast:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        mask = [any(start < b and max(end, start + 1) > a for a, b in spans) for start, end in enc["offset_mapping"]]
        return ids, mask
    # Slow tokenizers have no offsets. A span starts after the tokens the text before it shares with the
    # whole text: a prefix can tokenize differently at its end (SentencePiece makes a trailing space its own
    # piece, "▁", where the whole text joins it to the next word as "▁H"), so counting its tokens is not enough.
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    def shared(prefix: str) -> int:
        head = tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
        return next((i for i, (x, y) in enumerate(zip(head, ids, strict=False)) if x != y), min(len(head), len(ids)))

    mask = [False] * len(ids)
    for a, b in spans:
        first, last = shared(text[:a]), len(ids) if b == len(text) else shared(text[:b])
        mask[first:last] = [True] * max(0, last - first)
    return ids, mask


def _is_empty(row: dict, fmt: str) -> bool:
    """Every text field of a (checked) row is empty or whitespace: it holds no example."""
    if fmt == "alpaca":
        return not any((row.get(k) or "").strip() for k in ("instruction", "input", "output"))
    if fmt == "text":
        return not row["text"].strip()
    return not any(m["content"].strip() for m in row["messages"])


CHARS_PER_TOKEN_BOUND = 32
"""A row's text is tokenized at most this many characters per max_seq_len token at first (see _capped_loss_mask)."""


def _capped_loss_mask(tokenizer, text: str, spans: list[tuple[int, int]], max_seq_len: int) -> tuple[list[int], list[bool]]:
    """_loss_mask of enough of `text` for its first max_seq_len tokens, which are all a row keeps: a 50 MB row is not
    tokenized whole (10 GB of offsets, minutes) to be cut to max_seq_len tokens.

    This loses nothing. A token of any tokenizer transformers ships covers at least a fraction of a character (a
    byte-fallback piece) and rarely more than a few, so max_seq_len * CHARS_PER_TOKEN_BOUND characters give far more
    than max_seq_len tokens; and tokenizers merge within a word or pre-tokenized piece, so the tokens long before the
    cut are those of the whole text. Requiring 2 * max_seq_len tokens from the cut text keeps the kept tokens a full
    max_seq_len tokens away from the cut even for a tokenizer that drops or merges many characters; short of that,
    four times the text is tried, up to all of it."""
    limit = max_seq_len * CHARS_PER_TOKEN_BOUND
    while len(text) > limit:
        ids, mask = _loss_mask(tokenizer, text[:limit], [(a, min(b, limit)) for a, b in spans if a < limit])
        if len(ids) >= 2 * max_seq_len:
            return ids, mask
        limit *= 4
    return _loss_mask(tokenizer, text, spans)


def _tokenize_row(row: dict, fmt: str, tokenizer, max_seq_len: int, train_on_prompt: bool) -> dict:
    """tokenize_row without the row's name: raises RowError."""
    field = "messages"
    if fmt == "sharegpt":
        row, fmt, field = {"messages": sharegpt_messages(row.get("conversations"))}, "chat", "conversations"
    segments = _segments(row, fmt, tokenizer, field)
    if _is_empty(row, fmt):
        # Dropped and counted (keep_trainable), not refused: exports of large corpora hold a few such rows, and one
        # should not stop a run. Kept, it would teach an empty prompt an immediate eos (its one loss token).
        return {"input_ids": [], "labels": [], "num_loss_tokens": 0, "truncated": False, "empty": True}
    text, spans = "", []
    for piece, takes_loss in segments:
        if takes_loss or train_on_prompt:
            spans.append((len(text), len(text) + len(piece)))
        text += piece
    ids, mask = _capped_loss_mask(tokenizer, text, spans, max_seq_len)
    if fmt != "chat":  # alpaca and text rows end with eos so the model learns to stop; chat templates add their own
        ids.append(tokenizer.eos_token_id)
        mask.append(segments[-1][1] or train_on_prompt)
    # The bos rule sampling uses too (prompts.prompt_token_ids), so a prompt starts as its training rows did.
    bos = leading_bos(tokenizer, text, chat=fmt == "chat")
    ids, mask = bos + ids, [False] * len(bos) + mask
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
    truncated = len(ids) > max_seq_len
    ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    # The first token has nothing before it to be predicted from; in a packed row, a label there would
    # train the previous example's last token to predict this one.
    if labels:
        labels[0] = IGNORE_INDEX
    n_loss = sum(1 for t in labels if t != IGNORE_INDEX)
    return {"input_ids": ids, "labels": labels, "num_loss_tokens": n_loss, "truncated": truncated, "empty": False}


def tokenize_row(row: dict, fmt: str, tokenizer, max_seq_len: int, train_on_prompt: bool, where: str = "row ?") -> dict:
    """One row as input_ids, labels, num_loss_tokens, truncated and empty (every text field empty: dropped later).
    A malformed row is a DataError naming it as `where` ("line 7")."""
    try:
        return _tokenize_row(row, fmt, tokenizer, max_seq_len, train_on_prompt)
    except RowError as err:
        raise DataError(f"{where}: {err}") from None


@dataclass
class TokenizedSplit:
    dataset: datasets.Dataset
    num_rows: int
    num_truncated: int
    num_dropped: int
    """Rows without a loss token left after truncation."""
    num_empty: int = 0
    """Rows whose every text field is empty, dropped too."""


def tokenize_rows(ds: datasets.Dataset, fmt: str, tokenizer, max_seq_len: int, train_on_prompt: bool, source: str,
                  cache_file: str | None = None, fingerprint: str | None = None, file: Path | None = None) -> datasets.Dataset:
    """Every row tokenized (input_ids, labels, num_loss_tokens, truncated, empty), rows without a loss token kept.
    With cache_file the result is written there as Arrow (msplora_dist.train.cache), under `fingerprint` (which
    spares datasets hashing the tokenizer); else where datasets puts it. `file`: the one file the rows were read
    from, so that a bad row is named by its line there (row_namer)."""
    if len(ds) == 0:
        raise DataError(f"data {source!r} has no rows; expected at least one example")
    if fmt in CHAT_FORMATS:
        ensure_chat_template(tokenizer)

    name = row_namer(file)

    def fn(row, idx):
        try:
            return _tokenize_row(row, fmt, tokenizer, max_seq_len, train_on_prompt)
        except RowError as err:
            raise DataError(f"{name(idx)}: {err}") from None

    try:
        return ds.map(fn, with_indices=True, remove_columns=ds.column_names, desc="tokenizing", load_from_cache_file=False,
                      cache_file_name=cache_file, new_fingerprint=fingerprint)
    except DataError as err:
        raise DataError(f"data {source!r}: {err}") from None


def keep_trainable(tokenized: datasets.Dataset, source: str, max_seq_len: int) -> TokenizedSplit:
    """The rows that have a loss token left after truncation, and the counts of what was cut."""
    num_truncated, num_empty = int(sum(tokenized["truncated"])), int(sum(tokenized["empty"]))
    # keep_in_memory: an indices mapping in memory, never a file beside a (shared, cached) Arrow file.
    kept = tokenized.filter(lambda n: [x > 0 for x in n], input_columns="num_loss_tokens", batched=True,
                            load_from_cache_file=False, keep_in_memory=True)
    if len(kept) == 0 and num_empty == len(tokenized):
        raise DataError(f"data {source!r}: all of its {len(tokenized)} rows are empty (every field an empty string); "
                        "expected examples")
    if len(kept) == 0:
        raise DataError(f"data {source!r}: none of its {len(tokenized)} rows has a response token within max_seq_len={max_seq_len}; "
                        "expected shorter prompts or a larger max_seq_len")
    return TokenizedSplit(kept.remove_columns(["truncated", "empty"]), len(tokenized), num_truncated,
                          len(tokenized) - len(kept) - num_empty, num_empty)


def tokenize_dataset(ds: datasets.Dataset, fmt: str, tokenizer, max_seq_len: int, train_on_prompt: bool,
                     source: str, file: Path | None = None) -> TokenizedSplit:
    return keep_trainable(tokenize_rows(ds, fmt, tokenizer, max_seq_len, train_on_prompt, source, file=file), source,
                          max_seq_len)


def pack_examples(ds: datasets.Dataset, max_seq_len: int, seed: int) -> datasets.Dataset:
    """Greedy packing of whole examples, in a seeded order, into rows of at most max_seq_len tokens.
    position_ids restart at 0 for each example; transformers turns that into a block-diagonal mask."""
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    rows, cur = [], {"input_ids": [], "labels": [], "position_ids": [], "num_loss_tokens": 0}
    for i in order:
        ex = ds[i]
        if cur["input_ids"] and len(cur["input_ids"]) + len(ex["input_ids"]) > max_seq_len:
            rows.append(cur)
            cur = {"input_ids": [], "labels": [], "position_ids": [], "num_loss_tokens": 0}
        cur["input_ids"] += ex["input_ids"]
        cur["labels"] += ex["labels"]
        cur["position_ids"] += list(range(len(ex["input_ids"])))
        cur["num_loss_tokens"] += ex["num_loss_tokens"]
    if cur["input_ids"]:
        rows.append(cur)
    return datasets.Dataset.from_list(rows)


# --- batching -----------------------------------------------------------------------------------------

def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example. Packed rows carry position_ids and no attention mask."""
    width = max(len(e["input_ids"]) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    batch = {"input_ids": input_ids, "labels": labels}
    packed = "position_ids" in examples[0]
    if packed:
        batch["position_ids"] = torch.zeros((n, width), dtype=torch.long)
    else:
        batch["attention_mask"] = torch.zeros((n, width), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        input_ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        if packed:
            # Padding continues the last example's positions, so it forms no new "document".
            pos = e["position_ids"]
            batch["position_ids"][i, :k] = torch.tensor(pos)
            batch["position_ids"][i, k:] = torch.arange(pos[-1] + 1, pos[-1] + 1 + width - k)
        else:
            batch["attention_mask"][i, :k] = 1
    return batch


class GlobalBatchSampler:
    """Indices of global batches: epoch e is a permutation seeded by (seed, e); step k of it takes the
    k-th block of global_batch indices (an incomplete last block is dropped). Within a global batch,
    micro-batch j (j = accum_step * world + rank) is the j-th block of micro_batch indices."""

    def __init__(self, num_examples: int, global_batch: int, seed: int):
        if num_examples < global_batch:
            raise DataError(f"the training split has {num_examples} examples, fewer than one global batch of {global_batch}; "
                            "expected more data or a smaller micro_batch_size x grad_accum x world size")
        self.num_examples, self.global_batch, self.seed = num_examples, global_batch, seed
        self.steps_per_epoch = num_examples // global_batch
        self._epoch, self._perm = None, None

    def global_batch_indices(self, step: int) -> list[int]:
        """The examples of optimizer step `step` (0-based, counted over all epochs)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._perm = torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            self._epoch = epoch
        return self._perm[k * self.global_batch:(k + 1) * self.global_batch].tolist()

    def micro_batch_indices(self, step: int, accum_step: int, rank: int, world: int, micro_batch: int) -> list[int]:
        j = accum_step * world + rank
        return self.global_batch_indices(step)[j * micro_batch:(j + 1) * micro_batch]


def eval_batches(num_examples: int, micro_batch: int, rank: int, world: int) -> list[list[int]]:
    """Rank `rank`'s share of the eval set, in micro-batches. Every rank gets the same number of
    batches (ZeRO-3 gathers are collective); a rank with nothing left gets empty batches, which the
    trainer runs on a dummy example with zero weight."""
    mine = list(range(rank, num_examples, world))
    per_rank = -(-num_examples // world)
    n_batches = -(-per_rank // micro_batch)
    return [mine[b * micro_batch:(b + 1) * micro_batch] for b in range(n_batches)]
