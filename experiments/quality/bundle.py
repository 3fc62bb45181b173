"""Move an experiment root between this machine and the GPU machine through the device tool's file limits.

A device call returns at most 8 files of at most 16 MiB each (64 MiB together) from $OUT, and carries at
most 64 MiB of ignored paths to the next machine. The base model alone is 44 MB, so what must travel is
packed into one gzipped tar, cut into parts of --part_mb, with a manifest of sha256 sums:

    python -m experiments.quality.bundle pack --root runs/quality --what base --out "$OUT"   # base.tgz.000.. + base.bundle.json
    python -m experiments.quality.bundle pack --root runs/quality --what grid --out "$OUT"   # grid results (+ two adapters)
    python -m experiments.quality.bundle unpack --src <files_at> --root runs/quality   # verify, then extract

--what base: corpus/manifest.json, tokenizer/, task/, base/ (never the corpus text: it is rebuilt from the
Python installation, and the manifest's hashes say whether it would come out the same).
--what grid: grid/grid.json and, per cell, result.json, summary.json, train_config.yaml, train.log,
generations.jsonl, plus the adapter/ directories of the cells matching --adapters (default: the two that
report.py analyses).

One file larger than a call carries (the 98 MB SmolLM2 GGUF) goes in several calls, one part each:

    python -m experiments.quality.bundle split --file SmolLM2-135M-Instruct.Q4_1.gguf --parts 2 --out runs/smol/gguf
    python -m experiments.quality.bundle join --src runs/smol/gguf --out models/SmolLM2-135M-Instruct.Q4_1.gguf

split writes NAME.part0, NAME.part1, ... and NAME.split.json (size and sha256 of the file and of every part);
join checks every part and the joined file against it, writes the file atomically, and fails naming what is
missing or corrupt.
"""

from __future__ import annotations

import argparse
import fnmatch
import gzip
import io
import platform
import tarfile
from pathlib import Path

from experiments.quality import qlib
from msplora_dist.utils.fileio import sha256_file

CELL_FILES = ("result.json", "summary.json", "train_config.yaml", "train.log", "generations.jsonl")
DEFAULT_ADAPTERS = ("lora_qv_r64__final__*__s1", "msp_qv_paper__final__*__s1")


def base_members(root: Path) -> list[Path]:
    wanted = [root / "corpus" / "manifest.json", root / "tokenizer", root / "task", root / "base"]
    return [p for p in wanted if p.exists()]


def grid_members(root: Path, adapter_patterns) -> list[Path]:
    grid = root / "grid"
    out = [grid / "grid.json"] if (grid / "grid.json").exists() else []
    for cell in sorted((grid / "cells").glob("*")) if (grid / "cells").exists() else []:
        out += [cell / f for f in CELL_FILES if (cell / f).exists()]
        if any(fnmatch.fnmatch(cell.name, pat) for pat in adapter_patterns) and (cell / "adapter").exists():
            out.append(cell / "adapter")
    return out


class PartWriter(io.RawIOBase):
    """A write-only stream that cuts what it receives into files prefix.000, prefix.001, ... of part_bytes."""

    def __init__(self, prefix: Path, part_bytes: int):
        self.prefix, self.part_bytes, self.parts, self._f, self._n = prefix, part_bytes, [], None, 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view, written = memoryview(data), 0
        while written < len(view):
            if self._f is None or self._n >= self.part_bytes:
                self._next()
            k = min(len(view) - written, self.part_bytes - self._n)
            self._f.write(view[written:written + k])
            self._n += k
            written += k
        return written

    def _next(self) -> None:
        if self._f:
            self._f.close()
        path = Path(f"{self.prefix}.{len(self.parts):03d}")
        self.parts.append(path)
        self._f, self._n = open(path, "wb"), 0  # noqa: SIM115 (closed in _next/close)

    def close(self) -> None:
        if self._f:
            self._f.close()
            self._f = None
        super().close()


def pack(root: Path, members: list[Path], out: Path, name: str, part_mb: float) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{name}.tgz.*"):
        old.unlink()
    writer = PartWriter(out / f"{name}.tgz", int(part_mb * 2**20))
    with gzip.GzipFile(fileobj=writer, mode="wb", compresslevel=1, mtime=0) as gz, tarfile.open(fileobj=gz, mode="w|") as tar:
        for m in members:
            tar.add(m, arcname=m.relative_to(root).as_posix())
    writer.close()
    manifest = {"name": name, "members": [m.relative_to(root).as_posix() for m in members],
                "parts": [{"file": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in writer.parts],
                "python": platform.python_version()}
    qlib.write_json(out / f"{name}.bundle.json", manifest)
    total = sum(p["bytes"] for p in manifest["parts"])
    print(f"packed {len(members)} paths of {root} into {len(writer.parts)} part(s), {total / 2**20:.1f} MiB, in {out}")
    return manifest


def unpack(src: Path, root: Path) -> list[str]:
    """Verify and extract every *.bundle.json's parts found in src (searched recursively) into root."""
    names = []
    for manifest_path in sorted(src.rglob("*.bundle.json")):
        manifest = qlib.read_json(manifest_path)
        parts = [manifest_path.parent / p["file"] for p in manifest["parts"]]
        for part, meta in zip(parts, manifest["parts"], strict=True):
            if not part.exists() or sha256_file(part) != meta["sha256"]:
                raise SystemExit(f"error: {part} is missing or does not match its sha256 in {manifest_path}")
        stream = io.BytesIO(b"".join(p.read_bytes() for p in parts))
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=stream, mode="r:gz") as tar:
            tar.extractall(root, filter="data")
        names.append(manifest["name"])
        print(f"unpacked {manifest['name']} ({len(manifest['members'])} paths) into {root}")
    if not names:
        raise SystemExit(f"error: no *.bundle.json under {src}")
    return names


def split_file(file: Path, parts: int, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    size = file.stat().st_size
    step = -(-size // parts)
    record = {"file": file.name, "bytes": size, "sha256": sha256_file(file), "parts": []}
    with open(file, "rb") as f:
        for i in range(parts):
            part = out / f"{file.name}.part{i}"
            part.write_bytes(f.read(step))
            record["parts"].append({"file": part.name, "bytes": part.stat().st_size, "sha256": sha256_file(part)})
    qlib.write_json(out / f"{file.name}.split.json", record)
    print(f"split {file} ({size / 2**20:.1f} MiB) into {parts} parts in {out}")
    return record


def join_file(src: Path, out: Path) -> Path:
    records = sorted(src.glob("*.split.json"))
    if len(records) != 1:
        raise SystemExit(f"error: expected one *.split.json in {src}, found {len(records)}")
    record = qlib.read_json(records[0])
    for meta in record["parts"]:
        part = src / meta["file"]
        if not part.exists():
            raise SystemExit(f"error: {part} is missing (each part travels in its own device call)")
        if sha256_file(part) != meta["sha256"]:
            raise SystemExit(f"error: {part} does not match its sha256 in {records[0]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        for meta in record["parts"]:
            f.write((src / meta["file"]).read_bytes())
    if sha256_file(tmp) != record["sha256"]:
        tmp.unlink()
        raise SystemExit(f"error: the joined {record['file']} does not match its sha256")
    tmp.replace(out)
    print(f"joined {len(record['parts'])} parts into {out} (sha256 {record['sha256'][:16]}...)")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack")
    pk.add_argument("--root", type=Path, default=qlib.DEFAULT_ROOT)
    pk.add_argument("--what", choices=("base", "grid"), required=True)
    pk.add_argument("--out", type=Path, required=True)
    pk.add_argument("--part_mb", type=float, default=15.0)
    pk.add_argument("--adapters", default=",".join(DEFAULT_ADAPTERS), help="glob patterns of cells whose adapter/ is packed")
    up = sub.add_parser("unpack")
    up.add_argument("--src", type=Path, required=True)
    up.add_argument("--root", type=Path, default=qlib.DEFAULT_ROOT)
    sp = sub.add_parser("split")
    sp.add_argument("--file", type=Path, required=True)
    sp.add_argument("--parts", type=int, default=2)
    sp.add_argument("--out", type=Path, required=True)
    jn = sub.add_parser("join")
    jn.add_argument("--src", type=Path, required=True)
    jn.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.cmd == "split":
        split_file(args.file, args.parts, args.out)
        return
    if args.cmd == "join":
        join_file(args.src, args.out)
        return
    if args.cmd == "pack":
        patterns = [x for x in args.adapters.split(",") if x]
        members = base_members(args.root) if args.what == "base" else grid_members(args.root, patterns)
        if not members:
            raise SystemExit(f"error: nothing to pack for --what {args.what} under {args.root}")
        pack(args.root, members, args.out, args.what, args.part_mb)
    else:
        unpack(args.src, args.root)


if __name__ == "__main__":
    main()
