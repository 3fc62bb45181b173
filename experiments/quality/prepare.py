"""Corpus and tokenizer of the quality test: the running Python's standard library, split by module.

Run on the machine that trains (its Python's standard library is the corpus; the manifest records which):

    python -m experiments.quality.prepare --root runs/quality                    # ~20 s on 2 cores
    python -m experiments.quality.prepare --root runs/quality-smoke --max_units 10 --max_unit_kb 120 --vocab_size 1024

What it does, deterministically (same files + same flags -> same bytes; SentencePiece runs on one thread):

1. Lists every *.py under sysconfig's stdlib directory (site-packages, dist-packages, __pycache__ excluded),
   sorted by relative path; reads them as UTF-8 (files that are not are skipped and listed).
2. Gives each file a *unit*: its top-level module or package (asyncio/events.py -> asyncio). Tests follow
   the module they test (test/test_json/... -> json, test/test_asyncio/... -> asyncio) and private twins
   follow theirs (_pydecimal -> decimal, _pyio -> io), so a held-out module's text does not reach the base
   through them. Test files that match no module form the unit "test", always pretraining text.
3. Splits the units by a salted sha256 of the unit name: a fraction (--held_out 0.3) are *task* units,
   the rest *pretraining* units; 1% of the pretraining files (by path hash) are a pretraining validation set.
   The base model never sees the task units: they go to corpus/task.jsonl, which only make_task.py reads.
4. Trains a SentencePiece BPE tokenizer (byte fallback, no normalisation, like the LLaMA tokenizers) on the
   lines of the pretraining files only, and writes it as a Hugging Face tokenizer directory that loads
   offline with AutoTokenizer (tools/sentencepiece_bpe.py: the trainer and construction of the shipped default
   tokenizer, with a larger vocabulary and longer lines), after checking
   that it encodes sample files exactly like the SentencePiece model and decodes them back.

Outputs under --root: corpus/{pretrain,pretrain_val,task}.jsonl ({"path", "unit", "text"} per file),
corpus/manifest.json (Python version, stdlib path, every file's sha256, unit and role, skipped files,
counts, the split's salt) and tokenizer/.

A standard library can also travel as an archive, so the corpus is the same on every machine whatever its
Python (a Debian/Ubuntu Python, for one, ships its test suite, tkinter and lib2to3 as separate packages):

    python -m experiments.quality.prepare --write_archive .quality/stdlib.tgz     # this Python's .py files, ~6.5 MB
    python -m experiments.quality.prepare --root runs/quality --stdlib .quality/stdlib.tgz

The archive is deterministic (sorted, zero timestamps and owners) and holds STDLIB_VERSION.json (the Python
that it came from), which the manifest then records as stdlib_python.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import platform
import shutil
import sys
import sysconfig
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

from experiments.quality import qlib
from msplora_dist.utils.fileio import sha256_file

qlib.offline_env()

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
CATCH_ALL_UNIT = "test"
DEFAULT_SALT = "msplora-quality-v1"
MAX_FILE_BYTES = 2_000_000
ROLES = ("pretrain", "pretrain_val", "task")


# --- listing and unit assignment ------------------------------------------------------------------------

def stdlib_dir() -> Path:
    """The standard library of the running interpreter (also correct inside a virtual environment)."""
    return Path(sysconfig.get_path("stdlib")).resolve()


def list_source_files(root: Path) -> list[str]:
    """Relative POSIX paths of every .py file under root, sorted, without third-party or cache dirs."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        rel_dir = Path(dirpath).relative_to(root)
        found += [(rel_dir / f).as_posix() for f in filenames if f.endswith(".py")]
    return sorted(found)


def top_level_name(rel: str) -> str:
    first = rel.split("/", 1)[0]
    return first[:-3] if first.endswith(".py") else first


def _candidates(name: str) -> list[str]:
    """Module names a test or private file may belong to: json, py-prefixed twins, the part before '_',
    the name without trailing digits (test_urllib2 -> urllib)."""
    out = [name]
    if name.startswith("py") and len(name) > 2:
        out.append(name[2:])
    head = name.split("_")[0]
    out += [head, name.rstrip("0123456789"), head.rstrip("0123456789")]
    return [c for c in dict.fromkeys(out) if c]


def unit_of(rel: str, module_units: set[str]) -> str:
    """The unit of one file; module_units are the top-level names of the non-test files."""
    top = top_level_name(rel)
    if top == "test":
        name = rel.split("/")[1]
        name = name[:-3] if name.endswith(".py") else name
        if name.startswith("test_"):
            for c in _candidates(name[5:]):
                if c in module_units:
                    return c
        return CATCH_ALL_UNIT
    if top.startswith("_"):
        for c in _candidates(top.lstrip("_")):
            if c in module_units and c != top:
                return c
    return top


def assign_units(rels: list[str]) -> dict[str, str]:
    module_units = {top_level_name(r) for r in rels if top_level_name(r) != "test"}
    return {r: unit_of(r, module_units) for r in rels}


def split_units(units, held_out: float, salt: str) -> dict[str, str]:
    """unit -> 'task' (held out from pretraining) or 'pretrain', from a salted hash of the name alone."""
    return {u: "task" if u != CATCH_ALL_UNIT and qlib.stable_fraction(u, salt) < held_out else "pretrain"
            for u in sorted(set(units))}


def file_role(rel: str, unit_role: str, val_fraction: float, salt: str) -> str:
    if unit_role == "task":
        return "task"
    return "pretrain_val" if qlib.stable_fraction(rel, salt + ":val") < val_fraction else "pretrain"


def subset_units(unit_roles: dict[str, str], unit_bytes: dict[str, int], max_units: int, max_unit_kb: float,
                 salt: str, only: list[str] | None = None) -> set[str]:
    """The units a smoke run keeps: `only` if given, else per role the max_units units of at most
    max_unit_kb KB with the smallest hash (0 = all)."""
    if only:
        unknown = sorted(set(only) - set(unit_roles))
        if unknown:
            raise SystemExit(f"error: --units {unknown} are not units of this standard library")
        return set(only)
    if max_units <= 0:
        return set(unit_roles)
    keep = set()
    for role in ("pretrain", "task"):
        units = sorted((u for u, r in unit_roles.items() if r == role and (not max_unit_kb or unit_bytes[u] <= max_unit_kb * 1024)),
                       key=lambda u: qlib.stable_fraction(u, salt + ":subset"))
        keep.update(units[:max_units])
    return keep


# --- archives -------------------------------------------------------------------------------------------

ARCHIVE_META = "STDLIB_VERSION.json"


def write_archive(root: Path, out: Path) -> dict:
    """A deterministic .tgz of root's .py files (the listing above) plus STDLIB_VERSION.json."""
    meta = {"python": platform.python_version(), "implementation": platform.python_implementation(),
            "stdlib_dir": str(root), "platform": platform.platform()} if root == stdlib_dir() else {"stdlib_dir": str(root)}

    def info(name: str, size: int) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o644, 0, 0, "", ""
        return ti

    out.parent.mkdir(parents=True, exist_ok=True)
    rels = list_source_files(root)
    with (open(out, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz,
          tarfile.open(fileobj=gz, mode="w|") as tar):
        blob = json.dumps(meta, indent=1).encode()
        tar.addfile(info(ARCHIVE_META, len(blob)), io.BytesIO(blob))
        for rel in rels:
            data = (root / rel).read_bytes()
            tar.addfile(info(rel, len(data)), io.BytesIO(data))
    return {**meta, "files": len(rels), "archive": str(out), "bytes": out.stat().st_size, "sha256": sha256_file(out)}


def open_stdlib(arg: Path | None, scratch: Path) -> tuple[Path, dict]:
    """(directory to read, what it is): the running Python's stdlib, a directory, or an archive (unpacked
    into scratch)."""
    if arg is None:
        return stdlib_dir(), {"stdlib_python": platform.python_version(), "stdlib_source": "the running interpreter"}
    if arg.is_dir():
        return arg.resolve(), {"stdlib_python": None, "stdlib_source": f"directory {arg}"}
    with tarfile.open(arg, "r:*") as tar:
        tar.extractall(scratch, filter="data")
    meta = json.loads((scratch / ARCHIVE_META).read_text()) if (scratch / ARCHIVE_META).exists() else {}
    return scratch, {"stdlib_python": meta.get("python"), "stdlib_source": f"archive {arg} (sha256 {sha256_file(arg)})",
                     "stdlib_archive_meta": meta}


# --- reading ----------------------------------------------------------------------------------------------

def decode_source(data: bytes) -> tuple[str | None, str | None]:
    """(text, None) or (None, why it is skipped). Newlines become \\n; a UTF-8 BOM is dropped."""
    if not data.strip():
        return None, "empty"
    if len(data) > MAX_FILE_BYTES:
        return None, f"larger than {MAX_FILE_BYTES} bytes"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not UTF-8"
    if "\0" in text:
        return None, "contains NUL"
    return text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n"), None


def build_corpus(root: Path, held_out: float, val_fraction: float, salt: str, max_units: int = 0,
                 max_unit_kb: float = 0, only_units: list[str] | None = None) -> tuple[dict[str, list[dict]], dict]:
    """Read and split the standard library at root: ({role: records}, manifest)."""
    rels = list_source_files(root)
    units = assign_units(rels)
    unit_roles = split_units(units.values(), held_out, salt)
    blobs = {r: (root / r).read_bytes() for r in rels}
    unit_bytes = Counter()
    for r in rels:
        unit_bytes[units[r]] += len(blobs[r])
    keep = subset_units(unit_roles, unit_bytes, max_units, max_unit_kb, salt, only_units)

    records: dict[str, list[dict]] = {role: [] for role in ROLES}
    files, skipped = [], []
    for rel in rels:
        unit = units[rel]
        if unit not in keep:
            continue
        text, why = decode_source(blobs[rel])
        if text is None:
            skipped.append({"path": rel, "unit": unit, "reason": why})
            continue
        role = file_role(rel, unit_roles[unit], val_fraction, salt)
        records[role].append({"path": rel, "unit": unit, "text": text})
        files.append({"path": rel, "sha256": qlib.sha256_bytes(blobs[rel]), "bytes": len(blobs[rel]), "unit": unit, "role": role})

    ensure_val_file(records, salt)
    for f in files:
        if f["path"] in {r["path"] for r in records["pretrain_val"]}:
            f["role"] = "pretrain_val"
    counts = {role: {"files": len(recs), "bytes": sum(len(r["text"].encode()) for r in recs),
                     "units": len({r["unit"] for r in recs})} for role, recs in records.items()}
    fingerprint = qlib.sha256_bytes("".join(f"{f['path']}\0{f['sha256']}\0{f['role']}\n" for f in files).encode())
    manifest = {
        "python": platform.python_version(), "implementation": platform.python_implementation(),
        "executable": sys.executable, "stdlib_dir": str(root), "salt": salt, "held_out_fraction": held_out,
        "val_fraction": val_fraction, "subset": {"max_units": max_units, "max_unit_kb": max_unit_kb, "units": only_units},
        "corpus_sha256": fingerprint, "counts": counts,
        "task_units": sorted(u for u in keep if unit_roles[u] == "task"),
        "pretrain_units": sorted(u for u in keep if unit_roles[u] == "pretrain"),
        "files": files, "skipped": skipped,
    }
    return records, manifest


def ensure_val_file(records: dict[str, list[dict]], salt: str) -> None:
    """A small corpus can hash no file into pretrain_val: then the pretraining file with the smallest
    validation hash moves there, so the pretraining loss always has a held-out check."""
    if records["pretrain_val"] or len(records["pretrain"]) < 2:
        return
    pick = min(records["pretrain"], key=lambda r: qlib.stable_fraction(r["path"], salt + ":val"))
    records["pretrain"].remove(pick)
    records["pretrain_val"].append(pick)


# --- tokenizer --------------------------------------------------------------------------------------------

def tokenizer_lines(texts) -> list[str]:
    """SentencePiece trains on lines (newlines themselves become byte-fallback tokens)."""
    return [line for text in texts for line in text.split("\n") if line.strip()]


def train_tokenizer(lines: list[str], vocab_size: int, seed: int) -> bytes:
    """tools.sentencepiece_bpe's trainer with this corpus's options: the vocabulary may end below vocab_size
    on a small (smoke) corpus, source lines up to 16 K bytes are trained on, and every line is read."""
    from tools.sentencepiece_bpe import train_sentencepiece

    return train_sentencepiece(lines, vocab_size, seed, hard_vocab_limit=False, max_sentence_length=16384, input_sentence_size=0)


def check_samples(records: dict[str, list[dict]], n: int = 40, max_chars: int = 20000) -> list[str]:
    """Texts to check the HF tokenizer against SentencePiece: the first n files of every role (those that
    do not start with whitespace: there the two differ by design, as for the LLaMA hub tokenizers)."""
    out = []
    for role in ROLES:
        for r in records[role][:n]:
            text = r["text"][:max_chars]
            if text and not text[0].isspace():
                out.append(text)
    return out


def write_hf_tokenizer(spm_bytes: bytes, out_dir: Path, samples: list[str], model_max_length: int = 1024) -> dict:
    """The SentencePiece model as a transformers LlamaTokenizer directory; checked, then moved into place."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from tools.sentencepiece_bpe import build_tokenizer, check_tokenizer

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        staged = Path(tmp) / "tokenizer"
        staged.mkdir()
        spm_path = staged / "tokenizer.model"
        spm_path.write_bytes(spm_bytes)
        sp = spm.SentencePieceProcessor(model_file=str(spm_path))
        tok = build_tokenizer(spm_path)
        tok.model_max_length = model_max_length
        tok.save_pretrained(staged)
        reloaded = AutoTokenizer.from_pretrained(staged)
        check_tokenizer(reloaded, sp, samples)
        n_bytes = sum(len(s.encode()) for s in samples)
        n_tokens = sum(len(reloaded.encode(s, add_special_tokens=False)) for s in samples)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        shutil.copytree(staged, out_dir, copy_function=shutil.copyfile)
    return {"vocab_size": len(reloaded), "sha256_tokenizer_model": qlib.sha256_bytes(spm_bytes),
            "checked_samples": len(samples), "bytes_per_token_on_samples": round(n_bytes / max(1, n_tokens), 3)}


# --- main -------------------------------------------------------------------------------------------------

def write_corpus(out: Path, records: dict[str, list[dict]], manifest: dict) -> None:
    if out.exists():
        shutil.rmtree(out)
    for role, recs in records.items():
        qlib.write_jsonl(out / f"{role}.jsonl", recs)
    qlib.write_json(out / "manifest.json", manifest)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=qlib.DEFAULT_ROOT, help="experiment root (corpus/ and tokenizer/ are written)")
    p.add_argument("--stdlib", type=Path, default=None,
                   help="standard-library directory or archive (--write_archive) to read (default: the running Python's)")
    p.add_argument("--write_archive", type=Path, default=None, help="write this Python's stdlib .py files to this .tgz and stop")
    p.add_argument("--held_out", type=float, default=0.3, help="fraction of units held out from pretraining for the task")
    p.add_argument("--val_fraction", type=float, default=0.01, help="fraction of pretraining files kept for validation")
    p.add_argument("--salt", default=DEFAULT_SALT, help="salt of the unit/file hashes (changing it changes the split)")
    p.add_argument("--vocab_size", type=int, default=8192)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--max_units", type=int, default=0, help="smoke: keep this many units per role (0: all)")
    p.add_argument("--max_unit_kb", type=float, default=0, help="smoke: only units of at most this size (KB)")
    p.add_argument("--units", default=None, help="comma-separated units to keep (tests); overrides --max_units")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.write_archive:
        info = write_archive((args.stdlib or stdlib_dir()).resolve(), args.write_archive)
        print(f"wrote {info['archive']}: {info['files']} files, {info['bytes'] / 2**20:.1f} MiB, sha256 {info['sha256'][:16]}")
        return info
    t0 = time.perf_counter()
    only = [u.strip() for u in args.units.split(",") if u.strip()] if args.units else None
    with tempfile.TemporaryDirectory() as scratch:
        root, source = open_stdlib(args.stdlib, Path(scratch))
        records, manifest = build_corpus(root, args.held_out, args.val_fraction, args.salt, args.max_units, args.max_unit_kb, only)
    manifest.update(source)
    if source.get("stdlib_archive_meta"):
        manifest["stdlib_dir"] = source["stdlib_archive_meta"].get("stdlib_dir", manifest["stdlib_dir"])
    if not records["pretrain"] or not records["task"]:
        raise SystemExit(f"error: the split left {len(records['pretrain'])} pretraining and {len(records['task'])} task files; "
                         "expected both non-empty (more units, or another --held_out)")
    t_read = time.perf_counter() - t0
    spm_bytes = train_tokenizer(tokenizer_lines(r["text"] for r in records["pretrain"]), args.vocab_size, args.seed)
    tok_info = write_hf_tokenizer(spm_bytes, args.root / "tokenizer", check_samples(records))
    manifest["tokenizer"] = {**tok_info, "requested_vocab_size": args.vocab_size, "seed": args.seed, "trained_on": "pretrain",
                             "model_type": "bpe", "byte_fallback": True}
    manifest["seconds"] = {"read_and_split": round(t_read, 2), "total": round(time.perf_counter() - t0, 2)}
    write_corpus(args.root / "corpus", records, manifest)
    c = manifest["counts"]
    counts = ", ".join(f"{role} {v['files']} files / {v['units']} units / {v['bytes'] / 1e6:.2f} MB" for role, v in c.items())
    print(f"stdlib of Python {manifest['stdlib_python'] or '?'} ({manifest['stdlib_source']}), read by Python {manifest['python']}: "
          f"{counts}; {len(manifest['skipped'])} skipped")
    print(f"task units: {', '.join(manifest['task_units'])}")
    print(f"tokenizer: vocab {tok_info['vocab_size']}, {tok_info['bytes_per_token_on_samples']} bytes/token on samples; "
          f"corpus sha256 {manifest['corpus_sha256'][:16]}; {qlib.fmt_duration(manifest['seconds']['total'])}")
    return manifest


if __name__ == "__main__":
    main()
