"""The tokenized-data cache: each source is tokenized once, and later runs and the other ranks memory-map it.

An entry is a folder {cache_dir}/{key}/ holding the tokenized rows as one Arrow file (datasets' own format,
memory-mapped by datasets.Dataset.from_file) and meta.json (what the key was made of, for people). The key
is a sha256 over everything that changes the tokens or their loss masks:

- the source: its name, split and subset, and the (path, size, mtime) of each of its files;
- its row format, max_seq_len and train_on_prompt;
- the tokenizer: the content of its files (tokenizer.json, tokenizer_config.json, *.model, ...), its class,
  size and special tokens, and for chat and ShareGPT rows the chat template in use;
- the reading and tokenizing code (the source of msplora_dist.train.rows, .data and .prompts).

Ranks start without a process group (the data is checked before any model loads), so they agree through a
file lock beside the entry: the first to take it tokenizes and writes the entry (into a temporary folder,
renamed when complete), the others wait, then map it. A failed tokenization (a bad row) leaves no entry, so
every rank reports the same error and nothing is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import datasets
from filelock import FileLock

from msplora_dist.train import data as data_module
from msplora_dist.train import prompts as prompts_module
from msplora_dist.train import rows as rows_module
from msplora_dist.train.data import CHAT_FORMATS, tokenize_rows
from msplora_dist.utils.fileio import sha256_file
from msplora_dist.utils.log import log

TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt", "*.model",
                   "*.tiktoken", "chat_template*")
DATA_FILE = "tokens.arrow"


def default_cache_dir() -> Path:
    return Path(datasets.config.HF_DATASETS_CACHE) / "msplora_tokenized"


def code_version() -> str:
    """The tokenizing code: a change to how rows become tokens must not reuse tokens made the old way."""
    modules = (data_module, prompts_module, rows_module)
    return hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in modules)).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer, fmt: str) -> dict:
    """What of the tokenizer decides a row's tokens: its files' content, class, size, special tokens, template."""
    where = Path(str(getattr(tokenizer, "name_or_path", "")))
    files = {}
    if where.is_dir():
        for pattern in TOKENIZER_FILES:
            for path in sorted(where.glob(pattern)):
                if path.is_file():
                    files[path.name] = sha256_file(path)
    elif where.is_file():  # a single-file checkpoint (GGUF): too large to hash on every run
        stat = where.stat()
        files[where.name] = f"{stat.st_size}:{stat.st_mtime_ns}"
    return {"path": str(where.resolve()) if str(where) else "", "files": files, "class": type(tokenizer).__name__,
            "size": len(tokenizer), "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
            "chat_template": tokenizer.chat_template if fmt in CHAT_FORMATS else None}


def cache_key(label: str, split: str, subset: str | None, files: list[Path], fmt: str, tokenizer, max_seq_len: int,
              train_on_prompt: bool) -> tuple[str, dict]:
    """(key, the parts it was made of)."""
    stats = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    parts = {"source": label, "split": split, "subset": subset, "files": stats, "format": fmt,
             "max_seq_len": max_seq_len, "train_on_prompt": train_on_prompt, "code": code_version(),
             "tokenizer": tokenizer_fingerprint(tokenizer, fmt)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32], parts


def tokenize_cached(rows: datasets.Dataset, fmt: str, tokenizer, max_seq_len: int, train_on_prompt: bool, *,
                    label: str, split: str, subset: str | None, files: list[Path], cache_dir: Path | None) -> datasets.Dataset:
    """data.tokenize_rows(rows), from the cache when an entry for the same key exists (memory-mapped), else
    tokenized and stored there. cache_dir None: no cache, tokenized every time."""
    file = files[0] if len(files) == 1 else None  # a bad row is named by its line there
    if cache_dir is None:
        return tokenize_rows(rows, fmt, tokenizer, max_seq_len, train_on_prompt, label, file=file)
    key, parts = cache_key(label, split, subset, files, fmt, tokenizer, max_seq_len, train_on_prompt)
    entry = cache_dir / key
    locks = cache_dir / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(str(locks / f"{key}.lock")):
        if not (entry / "meta.json").is_file():
            _build(entry, rows, fmt, tokenizer, max_seq_len, train_on_prompt, label, key, parts, file)
            log(f"data: tokenized {label} into the cache, {entry}")
        else:
            log(f"data: {label} reused from the cache (tokenized by an earlier run or another rank), {entry}")
    return datasets.Dataset.from_file(str(entry / DATA_FILE))


def _build(entry: Path, rows, fmt, tokenizer, max_seq_len, train_on_prompt, label, key, parts, file) -> None:
    tmp = entry.with_name(f".tmp-{entry.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tokenized = tokenize_rows(rows, fmt, tokenizer, max_seq_len, train_on_prompt, label,
                                  cache_file=str(tmp / DATA_FILE), fingerprint=key, file=file)
        del tokenized  # the Arrow file is complete once map returns
        (tmp / "meta.json").write_text(json.dumps(parts, indent=1))
        shutil.rmtree(entry, ignore_errors=True)  # an incomplete entry of an earlier, killed run
        os.replace(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
