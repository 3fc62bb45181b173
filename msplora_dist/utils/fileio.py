"""One copy of the file-safety helpers every writer uses: atomic file and directory writes (a reader sees
the old version or the new one, never half of one), sha256 of a file, and manifests (size and sha256 of
every file of a directory) that tell a complete directory from an interrupted write."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from msplora_dist.errors import ConfigError

MANIFEST = "manifest.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_dir_atomically(target: str | os.PathLike, write) -> Path:
    """Call write(tmp_dir) on a fresh temporary sibling of `target`, then rename it to `target`.
    An existing `target` is replaced only once the new one is complete."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as err:
        raise ConfigError(f"cannot write to {str(target.parent)!r}: {err.strerror}; expected a writable directory") from None
    try:
        write(tmp)
        # mkdtemp makes the directory 0700; readers (a server running as another user) need 0755.
        os.chmod(tmp, 0o755)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:  # put the previous adapter back where it was
                os.replace(old, target)
            raise
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def write_file_atomically(path: str | os.PathLike, text: str, encoding: str | None = None) -> Path:
    """Write `text` to a temporary sibling, fsync, rename: readers see the old file or the new one.
    `encoding` as open() takes it (None: the locale's)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding=encoding) as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """Write `directory`/manifest.json: size and sha256 of every file in it (call it last)."""
    files = {}
    for f in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = f.relative_to(directory).as_posix()
        files[rel] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    write_file_atomically(directory / MANIFEST, json.dumps({"files": files}, indent=1))


def verify_manifest(directory: Path) -> str | None:
    """None if every file `directory`/manifest.json lists is there with its size and sha256, else what is wrong
    (a manifest that is not the {"files": {path: {bytes, sha256}}} write_manifest writes included)."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (the write did not finish)"
    files = _read_manifest(manifest)
    if isinstance(files, str):
        return f"malformed manifest.json ({files})"
    for rel, info in files.items():
        f = directory / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != info["bytes"] or sha256_file(f) != info["sha256"]:
            return f"{rel} does not match its checksum"
    return None


def _read_manifest(manifest: Path) -> dict | str:
    """The manifest's files mapping, or what is wrong with it."""
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"not JSON: {err}"
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        return "expected a JSON object with a 'files' mapping"
    for rel, info in files.items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            return f"entry {rel!r} is not a path inside the folder"
        if not (isinstance(info, dict) and isinstance(info.get("bytes"), int) and isinstance(info.get("sha256"), str)):
            return f"entry {rel!r} is not {{bytes, sha256}}"
    return files
