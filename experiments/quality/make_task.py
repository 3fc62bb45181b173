"""The fine-tuning task of the quality test: write a function's docstring from its code.

Run after prepare.py, on the same root (reads corpus/task.jsonl only: modules the base never saw):

    python -m experiments.quality.make_task --root runs/quality                  # ~20 s
    python -m experiments.quality.make_task --root runs/quality-smoke --min_doc_chars 10
    python -m experiments.quality.make_task --root runs/smol/docstring --tokenizer models/smollm2   # another base's tokens

Every function and method of the held-out modules that has a docstring (not functions nested in functions:
their docstrings would sit in their parent's input) becomes one alpaca row:

    instruction  "Write the docstring of this Python function."
    input        the function's source (decorators, signature, body), dedented, without the docstring
    output       the docstring, cleaned like inspect.cleandoc (ast.get_docstring)

Rows are parsed with the ast module; the code without its docstring must parse again and have a non-empty
body. Filters: docstring of --min_doc_chars..--max_doc_chars characters; the whole row (prompt + docstring
+ eos, tokenized exactly as launch/train.py does) at most --max_seq_len tokens, so nothing is truncated;
each docstring text appears once (the first occurrence in path order is kept), so no eval answer is a train
answer. The split is by source FILE: files are taken in salted-hash order and each joins the split that keeps
the row counts closest to --test_fraction / --dev_fraction / the rest (train), so functions of one file never
straddle splits and no single large file (tkinter/__init__.py) swamps an eval split. dev selects the learning
rate, test is reported; neither is ever trained on.

Outputs under --root/task: train.jsonl, dev.jsonl, test.jsonl and manifest.json (counts, token lengths,
sha256 of each file, filters, the files of each split).
"""

from __future__ import annotations

import argparse
import ast
import statistics
import textwrap
import time
from pathlib import Path

from experiments.quality import qlib
from msplora_dist.utils.fileio import sha256_file

qlib.offline_env()

SPLITS = ("train", "dev", "test")
DEFAULT_SALT = "msplora-quality-task-v1"


# --- extraction -------------------------------------------------------------------------------------------

def _outer_functions(tree: ast.Module):
    """FunctionDef/AsyncFunctionDef nodes whose parents are the module or classes only."""
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                yield child
            elif isinstance(child, ast.ClassDef):
                stack.append(child)


def _blank(text: str) -> bool:
    return not text.strip()


def strip_docstring(lines: list[str], fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    """The function's source without its docstring statement, dedented; None when the docstring does not
    occupy whole lines of its own (a one-liner `def f(): "doc"`, `"doc"; x = 1`)."""
    doc = fn.body[0]
    start = min([fn.lineno, *(d.lineno for d in fn.decorator_list)])
    first, last = lines[doc.lineno - 1], lines[doc.end_lineno - 1]
    if not _blank(first[:doc.col_offset]):  # the signature's line, or a statement before it
        return None
    if not _blank(last[doc.end_col_offset:]) and not last[doc.end_col_offset:].lstrip().startswith("#"):
        return None
    kept = lines[start - 1:doc.lineno - 1] + lines[doc.end_lineno:fn.end_lineno]
    return textwrap.dedent("\n".join(kept)).strip("\n")


def _reparses_without_docstring(code: str) -> bool:
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return False
    fn = tree.body[0] if tree.body else None
    return isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) and bool(fn.body) and ast.get_docstring(fn) is None


def extract_functions(source: str, path: str) -> list[dict]:
    """[{path, name, lineno, code, docstring}] for the docstring-bearing functions of one file."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # lib2to3 test data is Python 2; some files hold NULs
        return []
    lines = source.split("\n")
    out = []
    for fn in _outer_functions(tree):
        docstring = ast.get_docstring(fn, clean=True)
        if not docstring or len(fn.body) < 2:  # no docstring, or a body that is the docstring alone
            continue
        code = strip_docstring(lines, fn)
        if code is None or not _reparses_without_docstring(code):
            continue
        out.append({"path": path, "name": fn.name, "lineno": fn.lineno, "code": code, "docstring": docstring.strip()})
    return sorted(out, key=lambda f: f["lineno"])


def assign_splits(file_rows: dict[str, int], fractions: dict[str, float], salt: str) -> dict[str, str]:
    """path -> split. Files are taken in salted-hash order; each goes to the split that leaves the row counts
    closest (least squares) to the target fractions. Deterministic; a very large file goes to train rather
    than swamping an eval split, and the eval splits get many small files (more modules)."""
    counts = dict.fromkeys(fractions, 0)
    out = {}
    for path in sorted(file_rows, key=lambda p: (qlib.stable_fraction(p, salt), p)):
        k = file_rows[path]
        total = sum(counts.values()) + k

        def cost(choice: str, k=k, total=total) -> float:
            return sum((counts[s] + (k if s == choice else 0) - fractions[s] * total) ** 2 for s in fractions)

        best = min(fractions, key=lambda s: (cost(s), SPLITS.index(s)))
        out[path] = best
        counts[best] += k
    # A small task can leave a split without files: give it train's smallest file (there must be >= 1 each).
    for split in fractions:
        train_files = sorted((p for p, s in out.items() if s == "train"), key=lambda p: (file_rows[p], qlib.stable_fraction(p, salt), p))
        if split != "train" and fractions[split] > 0 and split not in out.values() and len(train_files) > 1:
            out[train_files[0]] = split
    return out


def to_row(fn: dict) -> dict:
    return {"instruction": qlib.TASK_INSTRUCTION, "input": fn["code"], "output": fn["docstring"]}


def row_tokens(row: dict, tokenizer, max_seq_len: int) -> tuple[int, int, bool]:
    """(tokens, loss tokens, truncated) of a row as the trainer tokenizes it (msplora_dist.train.data)."""
    from msplora_dist.train.data import tokenize_row

    t = tokenize_row(row, "alpaca", tokenizer, 10**9, False)
    n = len(t["input_ids"])
    return n, t["num_loss_tokens"], n > max_seq_len


def build_task(task_records: list[dict], tokenizer, max_seq_len: int, min_doc_chars: int, max_doc_chars: int,
               dev_fraction: float, test_fraction: float, salt: str) -> tuple[dict[str, list[dict]], dict]:
    """({split: rows}, stats): extraction, filters, dedup (in path order), then the file-level split."""
    dropped = {"doc_too_short": 0, "doc_too_long": 0, "too_many_tokens": 0, "duplicate_docstring": 0}
    kept, seen_docs, n_found = [], set(), 0
    for rec in sorted(task_records, key=lambda r: r["path"]):
        for fn in extract_functions(rec["text"], rec["path"]):
            n_found += 1
            doc = fn["docstring"]
            if len(doc) < min_doc_chars:
                dropped["doc_too_short"] += 1
                continue
            if len(doc) > max_doc_chars:
                dropped["doc_too_long"] += 1
                continue
            row = to_row(fn)
            n, n_loss, too_long = row_tokens(row, tokenizer, max_seq_len)
            if too_long:
                dropped["too_many_tokens"] += 1
                continue
            if doc in seen_docs:
                dropped["duplicate_docstring"] += 1
                continue
            seen_docs.add(doc)
            kept.append((row, {"path": fn["path"], "unit": rec["unit"], "name": fn["name"], "lineno": fn["lineno"],
                               "tokens": n, "loss_tokens": n_loss}))
    file_rows: dict[str, int] = {}
    for _, m in kept:
        file_rows[m["path"]] = file_rows.get(m["path"], 0) + 1
    fractions = {"train": 1.0 - dev_fraction - test_fraction, "dev": dev_fraction, "test": test_fraction}
    split_of = assign_splits(file_rows, fractions, salt)
    rows = {s: [r for r, m in kept if split_of[m["path"]] == s] for s in SPLITS}
    meta = {s: [m for _, m in kept if split_of[m["path"]] == s] for s in SPLITS}
    stats = {"files": len(task_records), "functions_with_docstring": n_found, "dropped": dropped}
    for s in SPLITS:
        lens = [m["tokens"] for m in meta[s]] or [0]
        loss = [m["loss_tokens"] for m in meta[s]] or [0]
        stats[s] = {"rows": len(rows[s]), "files": len({m["path"] for m in meta[s]}), "tokens_mean": round(statistics.mean(lens), 1),
                    "tokens_max": max(lens), "loss_tokens_total": sum(loss), "loss_tokens_mean": round(statistics.mean(loss), 1),
                    "units": sorted({m["unit"] for m in meta[s]})}
    stats["functions"] = meta
    return rows, stats


# --- main -------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=qlib.DEFAULT_ROOT, help="experiment root (reads corpus/, tokenizer/; writes task/)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="the fine-tuned base's tokenizer (or model) directory, for the length filter (default: ROOT/tokenizer)")
    p.add_argument("--max_seq_len", type=int, default=512, help="rows longer than this (in tokens) are dropped")
    p.add_argument("--min_doc_chars", type=int, default=20)
    p.add_argument("--max_doc_chars", type=int, default=1200)
    p.add_argument("--dev_fraction", type=float, default=0.1, help="fraction of task FILES whose functions form dev")
    p.add_argument("--test_fraction", type=float, default=0.2, help="fraction of task FILES whose functions form test")
    p.add_argument("--salt", default=DEFAULT_SALT)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.root / "tokenizer")
    tokenizer.model_max_length = 10**9
    task_records = qlib.read_jsonl(args.root / "corpus" / "task.jsonl")
    rows, stats = build_task(task_records, tokenizer, args.max_seq_len, args.min_doc_chars, args.max_doc_chars,
                             args.dev_fraction, args.test_fraction, args.salt)
    out = args.root / "task"
    for s in SPLITS:
        qlib.write_jsonl(out / f"{s}.jsonl", rows[s])
    corpus_sha = qlib.read_json(args.root / "corpus" / "manifest.json")["corpus_sha256"]
    manifest = {"task": "docstring", "metric": "chrf", "instruction": qlib.TASK_INSTRUCTION, "corpus_sha256": corpus_sha,
                "args": {k: str(v) for k, v in vars(args).items()},
                "sha256": {s: sha256_file(out / f"{s}.jsonl") for s in SPLITS},
                **stats, "seconds": round(time.perf_counter() - t0, 2)}
    qlib.write_json(out / "manifest.json", manifest)
    print(f"task from {stats['files']} held-out files: {stats['functions_with_docstring']} functions with a docstring; "
          + ", ".join(f"{s} {stats[s]['rows']} rows / {stats[s]['files']} files / {stats[s]['tokens_mean']:.0f} tokens mean"
                      for s in SPLITS) + f"; dropped {stats['dropped']}; {qlib.fmt_duration(manifest['seconds'])}")
    return manifest


if __name__ == "__main__":
    main()
