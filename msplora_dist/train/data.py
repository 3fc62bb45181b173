"""Data: load rows with the datasets library, tokenize with loss masks, and sample global batches.

Every tokenized example carries input_ids, labels (-100 where no loss is taken) and num_loss_tokens.
The first token (bos) never carries a loss, so the shifted cross-entropy sees exactly num_loss_tokens
targets; the trainer divides by the global batch's total, which every rank can compute on its own.

Sampling (GlobalBatchSampler) depends only on (seed, epoch, global batch size): the global batch of
step k holds the same examples whatever the split into ranks x micro-batches x accumulation steps.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from jinja2 import TemplateError

from msplora_dist.errors import DataError
from msplora_dist.train.prompts import DEFAULT_CHAT_TEMPLATE, alpaca_prompt, sharegpt_messages

IGNORE_INDEX = -100
FORMATS = {"alpaca": ("instruction", "output"), "chat": ("messages",), "sharegpt": ("conversations",), "text": ("text",)}
CHAT_FORMATS = ("chat", "sharegpt")  # rendered by the chat template


# --- loading ------------------------------------------------------------------------------------------

def _locate_json_error(path: Path) -> str:
    """Find the first malformed line of a JSON Lines file (datasets' own error does not say)."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                return f"line {lineno}: {err.msg} (column {err.colno})"
            if not isinstance(row, dict):
                return f"line {lineno}: expected a JSON object per line, got {type(row).__name__}"
    return "no malformed line found"


def _check_utf8(path: Path) -> None:
    """JSON data must be UTF-8: a UTF-16 file (Windows editors write them) would otherwise be "Expecting value"."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    boms = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16"}
    found = next((f"is {name} encoded" for bom, name in boms.items() if head.startswith(bom)), None)
    if found is None and b"\x00" in head:
        found = "is UTF-16 or UTF-32 encoded (it holds NUL bytes)"
    if found is None:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as err:
            if err.start < len(head) - 4:  # not just a character cut at the end of the sample
                found = f"is not UTF-8 (an invalid byte at offset {err.start})"
    if found:
        raise DataError(f"data {str(path)!r} {found}; expected UTF-8 JSON")


def _holds_one_object(path: Path) -> bool:
    """True for a .json file that is a single JSON object (which datasets would read as one row, or as columns)."""
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    if not text.lstrip().startswith("{"):
        return False
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False  # JSON Lines: several objects


def load_rows(path: str | os.PathLike) -> datasets.Dataset:
    """A datasets.Dataset from a .json/.jsonl/.parquet file or a save_to_disk directory."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data {str(path)!r} does not exist; expected a .json/.jsonl/.parquet file or a datasets folder")
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise DataError(f"data {str(path)!r} holds splits {list(ds)}; expected a 'train' split or a single Dataset")
                ds = ds["train"]
            return ds
        suffix = path.suffix.lower()
        if suffix in (".json", ".jsonl"):
            _check_utf8(path)
            if suffix == ".json" and _holds_one_object(path):
                raise DataError(f"data {str(path)!r} holds one JSON object; expected a JSON array of rows, or JSON Lines "
                                "(one object per line)")
            if suffix == ".json" and path.read_text(encoding="utf-8", errors="replace").lstrip().startswith("["):
                try:
                    rows = json.loads(path.read_text(encoding="utf-8"))
                except json.JSONDecodeError as err:
                    raise DataError(f"data {str(path)!r}: line {err.lineno}: {err.msg} (column {err.colno})") from None
                if not all(isinstance(r, dict) for r in rows):
                    raise DataError(f"data {str(path)!r}: expected a JSON array of objects")
                return datasets.Dataset.from_list(rows)
            # datasets logs its own parse error before raising; ours (below) names the line instead.
            verbosity = datasets.logging.get_verbosity()
            datasets.logging.set_verbosity(datasets.logging.CRITICAL)
            try:
                return datasets.load_dataset("json", data_files=str(path), split="train")
            finally:
                datasets.logging.set_verbosity(verbosity)
        if suffix == ".parquet":
            return datasets.load_dataset("parquet", data_files=str(path), split="train")
    except DataError:
        raise
    except Exception as err:  # datasets wraps parse errors in many types; re-raise with the line
        if path.suffix.lower() in (".json", ".jsonl"):
            raise DataError(f"data {str(path)!r}: {_locate_json_error(path)}") from None
        raise DataError(f"data {str(path)!r} could not be read ({type(err).__name__}: {err})") from None
    raise DataError(f"data {str(path)!r}: unknown file type {path.suffix!r}; expected .json, .jsonl, .parquet or a datasets folder")


def detect_format(ds: datasets.Dataset, source: str) -> str:
    columns = set(ds.column_names)
    for name, needed in FORMATS.items():
        if set(needed) <= columns:
            return name
    expected = "; ".join(f"{k}: {', '.join(v)}" for k, v in FORMATS.items())
    raise DataError(f"data {source!r} has fields {sorted(columns)}; expected one of the row formats ({expected})")


# --- tokenizing ---------------------------------------------------------------------------------------

def ensure_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


def _segments(row: dict, fmt: str, tokenizer, lineno: int) -> list[tuple[str, bool]]:
    """The row as (text, takes_loss) segments, in order."""
    if fmt == "alpaca":
        instruction, output = row.get("instruction"), row.get("output")
        if not isinstance(instruction, str) or not isinstance(output, str):
            raise DataError(f"row {lineno}: 'instruction' and 'output' must be strings, got "
                            f"{type(instruction).__name__} and {type(output).__name__}")
        input_text = row.get("input") or ""
        if not isinstance(input_text, str):
            raise DataError(f"row {lineno}: 'input' must be a string (or absent), got {type(input_text).__name__}")
        return [(alpaca_prompt(instruction, input_text), False), (output, True)]
    if fmt == "text":
        if not isinstance(row.get("text"), str):
            raise DataError(f"row {lineno}: 'text' must be a string, got {type(row.get('text')).__name__}")
        return [(row["text"], True)]
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
        raise DataError(f"row {lineno}: 'messages' must be a non-empty list of {{role, content}} strings")
    def render(prefix: list[dict], generation_prompt: bool = False) -> str:
        try:
            return tokenizer.apply_chat_template(prefix, tokenize=False, add_generation_prompt=generation_prompt)
        except TemplateError as err:  # templates raise on roles or orders they do not support
            raise DataError(f"row {lineno}: the tokenizer's chat template refused the conversation: {err}") from None

    # Render growing prefixes: the text added by each assistant turn takes the loss. This works for any
    # template that renders a conversation's prefix as a prefix of the whole.
    segments, rendered = [], ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            through = render(messages[: i + 1])
            before = render(messages[:i], generation_prompt=True) if i else _opening_header(render, lineno)
            if not before.startswith(rendered) or not through.startswith(before):
                raise DataError(f"row {lineno}: the tokenizer's chat template does not render conversations prefix by prefix")
            segments += [(before[len(rendered):], False), (through[len(before):], True)]
            rendered = through
    full = render(messages)
    if full[len(rendered):]:
        segments.append((full[len(rendered):], False))
    return [s for s in segments if s[0]]


def _opening_header(render, lineno: int) -> str:
    """What the template writes before the content of a conversation's opening assistant turn (the part that
    takes no loss): rendered around a marker no real content contains, since templates may trim content."""
    marker = "\x00MSPLORA-CONTENT\x00"
    text = render([{"role": "assistant", "content": marker}])
    if marker not in text:
        raise DataError(f"row {lineno}: the tokenizer's chat template does not write an opening assistant turn's content as given")
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


def tokenize_row(row: dict, fmt: str, tokenizer, max_seq_len: int, train_on_prompt: bool, lineno: int = 0) -> dict:
    if fmt == "sharegpt":
        row, fmt = {"messages": sharegpt_messages(row.get("conversations"), lineno)}, "chat"
    segments = _segments(row, fmt, tokenizer, lineno)
    text, spans = "", []
    for piece, takes_loss in segments:
        if takes_loss or train_on_prompt:
            spans.append((len(text), len(text) + len(piece)))
        text += piece
    ids, mask = _loss_mask(tokenizer, text, spans)
    if fmt != "chat":  # alpaca and text rows end with eos so the model learns to stop; chat templates add their own
        ids.append(tokenizer.eos_token_id)
        mask.append(segments[-1][1] or train_on_prompt)
    # Chat templates often write the bos token themselves (Llama-2's, the shipped tiny model's).
    template_has_bos = fmt == "chat" and bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)
    if tokenizer.bos_token_id is not None and not template_has_bos:
        ids, mask = [tokenizer.bos_token_id, *ids], [False, *mask]
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
    truncated = len(ids) > max_seq_len
    ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    # The first token has nothing before it to be predicted from; in a packed row, a label there would
    # train the previous example's last token to predict this one.
    if labels:
        labels[0] = IGNORE_INDEX
    n_loss = sum(1 for t in labels if t != IGNORE_INDEX)
    return {"input_ids": ids, "labels": labels, "num_loss_tokens": n_loss, "truncated": truncated}


@dataclass
class TokenizedSplit:
    dataset: datasets.Dataset
    num_rows: int
    num_truncated: int
    num_dropped: int


def tokenize_rows(ds: datasets.Dataset, fmt: str, tokenizer, max_seq_len: int, train_on_prompt: bool, source: str,
                  cache_file: str | None = None, fingerprint: str | None = None) -> datasets.Dataset:
    """Every row tokenized (input_ids, labels, num_loss_tokens, truncated), rows without a loss token kept.
    With cache_file the result is written there as Arrow (msplora_dist.train.cache), under `fingerprint` (which
    spares datasets hashing the tokenizer); else where datasets puts it."""
    if len(ds) == 0:
        raise DataError(f"data {source!r} has no rows; expected at least one example")
    if fmt in CHAT_FORMATS:
        ensure_chat_template(tokenizer)

    def fn(row, idx):
        return tokenize_row(row, fmt, tokenizer, max_seq_len, train_on_prompt, lineno=idx + 1)

    try:
        return ds.map(fn, with_indices=True, remove_columns=ds.column_names, desc="tokenizing", load_from_cache_file=False,
                      cache_file_name=cache_file, new_fingerprint=fingerprint)
    except DataError as err:
        raise DataError(f"data {source!r}: {err}") from None


def keep_trainable(tokenized: datasets.Dataset, source: str, max_seq_len: int) -> TokenizedSplit:
    """The rows that have a loss token left after truncation, and the counts of what was cut."""
    num_truncated = int(sum(tokenized["truncated"]))
    # keep_in_memory: an indices mapping in memory, never a file beside a (shared, cached) Arrow file.
    kept = tokenized.filter(lambda n: [x > 0 for x in n], input_columns="num_loss_tokens", batched=True,
                            load_from_cache_file=False, keep_in_memory=True)
    if len(kept) == 0:
        raise DataError(f"data {source!r}: none of its {len(tokenized)} rows has a response token within max_seq_len={max_seq_len}; "
                        "expected shorter prompts or a larger max_seq_len")
    return TokenizedSplit(kept.remove_columns("truncated"), len(tokenized), num_truncated, len(tokenized) - len(kept))


def tokenize_dataset(ds: datasets.Dataset, fmt: str, tokenizer, max_seq_len: int, train_on_prompt: bool,
                     source: str) -> TokenizedSplit:
    return keep_trainable(tokenize_rows(ds, fmt, tokenizer, max_seq_len, train_on_prompt, source), source, max_seq_len)


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
