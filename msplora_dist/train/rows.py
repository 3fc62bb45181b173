"""Reading a data source's rows: JSON Lines, JSON arrays, Parquet and save_to_disk folders through the datasets
library, their row format found from their fields, and a bad row named by where it is in its file.

Errors are one line naming the file and the line (or row) and what was expected: datasets' own parse errors do
not say where, so a file it cannot read is scanned for the first line that explains why.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import datasets

from msplora_dist.errors import DataError, RowError

FORMATS = {"alpaca": ("instruction", "output"), "chat": ("messages",), "sharegpt": ("conversations",), "text": ("text",)}


def _locate_json_error(path: Path) -> str:
    """Find the first malformed line of a JSON Lines file (datasets' own error does not say): one that is not a JSON
    object, or whose field holds another type than on the lines before."""
    def rows():
        with open(path, encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    yield f"line {lineno}", line

    def parsed():
        for where, line in rows():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise RowError(f"{where}: {err.msg} (column {err.colno})") from None
            if not isinstance(row, dict):
                raise RowError(f"{where}: expected a JSON object per line, got {type(row).__name__}")
            yield where, row

    try:
        return _type_conflict(parsed()) or "no malformed line found"
    except RowError as err:
        return str(err)


def _type_conflict(rows) -> str | None:
    """The first (where, row) whose field holds another JSON type than on the rows before (an Arrow column has one
    type, so datasets cannot read it), else None. null fits any type."""
    types: dict[str, tuple[str, str]] = {}
    for where, row in rows:
        for key, value in row.items():
            if value is None:
                continue
            kind = "number" if isinstance(value, int | float) and not isinstance(value, bool) else type(value).__name__
            first = types.setdefault(key, (kind, where))
            if first[0] != kind:
                return f"{where}: '{key}' is a {kind}, but a {first[0]} in {first[1]}; expected one type per field"
    return None


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
                conflict = _type_conflict((f"row {i + 1}", r) for i, r in enumerate(rows))
                if conflict:
                    raise DataError(f"data {str(path)!r}: {conflict}")
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


# --- naming a row -------------------------------------------------------------------------------------

def _is_json_lines(path: Path) -> bool:
    if path.suffix.lower() == ".jsonl":
        return True
    if path.suffix.lower() != ".json":
        return False
    with open(path, encoding="utf-8-sig", errors="replace") as fh:
        return not fh.read(4096).lstrip().startswith("[")  # a JSON array is read whole, by load_rows


def row_namer(path: Path | None) -> Callable[[int], str]:
    """How an error names row i (0-based) of a source. Rows are tokenized in the order of their file, before any
    hold-out, shuffle or mix, so i is the file's own: in a JSON Lines file the row's line (datasets skips blank
    lines; the line count includes them), found only when an error needs it; elsewhere "row i+1"."""
    if path is None or not path.is_file() or not _is_json_lines(path):
        return lambda i: f"row {i + 1}"

    def line_of(i: int) -> str:
        seen = -1
        with open(path, encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                seen += bool(line.strip())
                if seen == i:
                    return f"line {lineno}"
        return f"row {i + 1}"

    return line_of
