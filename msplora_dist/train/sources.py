"""Data sources (--data, --eval_data): load each one, hold out its eval share, and mix the training parts.

Each source is read in its own row format (alpaca, chat, ShareGPT, text) and tokenized on its own (through the
tokenized cache, msplora_dist.train.cache), so a source keeps the loss masks it has alone, and a changed mix
reuses every source's cache. Several weighted sources are mixed with datasets.interleave_datasets: each
training row comes from source i with probability weight_i / sum(weights); unweighted sources are
concatenated. The eval parts are concatenated whole: eval loss is measured on every source as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from msplora_dist.train.config import DataSource
from msplora_dist.train.hub import is_hub_name, load_data_folder, load_hub_dataset
from msplora_dist.train.rows import detect_format, load_rows


def is_saved_dataset(path: Path) -> bool:
    """A datasets save_to_disk folder (a Dataset or a DatasetDict), as opposed to a folder of data files."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def load_source(source: DataSource) -> datasets.Dataset:
    """The rows of one source: a local file or save_to_disk folder (rows.load_rows), a folder of data files,
    or a Hub dataset name."""
    path = Path(source.path).expanduser()
    if path.is_file() or (path.is_dir() and is_saved_dataset(path)):
        return load_rows(path)
    if path.is_dir():
        return load_data_folder(path, source.split, source.subset, label=source.path)
    if not is_hub_name(source.path):
        return load_rows(path)  # says that it does not exist
    return load_hub_dataset(source.path, source.split, source.subset)


def source_files(source: DataSource, rows: datasets.Dataset) -> list[Path]:
    """The files whose (path, size, mtime) stand for the source's content in the tokenized cache's key:
    a local file, every file of a local folder, or the Arrow files datasets prepared for a Hub dataset."""
    path = Path(source.path).expanduser()
    if path.is_file():
        return [path.resolve()]
    if path.is_dir():
        return sorted(p.resolve() for p in path.rglob("*") if p.is_file())
    return sorted(Path(f["filename"]).resolve() for f in rows.cache_files)


@dataclass
class LoadedSource:
    source: DataSource
    rows: datasets.Dataset
    fmt: str
    files: list[Path]


def load_sources(sources: tuple[DataSource, ...]) -> list[LoadedSource]:
    """Every source loaded and its format detected, before anything is tokenized, so a wrong field in the
    last source fails as fast as one in the first."""
    loaded = []
    for source in sources:
        rows = load_source(source)
        loaded.append(LoadedSource(source, rows, detect_format(rows, source.path), source_files(source, rows)))
    return loaded


def hold_out(tokenized: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(train, eval) parts of one tokenized source; the same rows whatever else is in the run."""
    if fraction <= 0 or len(tokenized) < 2:
        return tokenized, None
    # Dataset.train_test_split's own split (a seeded permutation, the first ceil(fraction * n) rows held out),
    # taken with select(keep_in_memory=True): train_test_split writes its indices beside a file-backed
    # dataset's Arrow files, here the shared cache entry, and refuses keep_in_memory for one (datasets 5.2).
    n_test = math.ceil(fraction * len(tokenized))
    order = np.random.default_rng(seed).permutation(len(tokenized))
    return tokenized.select(order[n_test:], keep_in_memory=True), tokenized.select(order[:n_test], keep_in_memory=True)


def mix(parts: list[datasets.Dataset], weights: list[float | None], seed: int, strategy: str) -> datasets.Dataset:
    """One training set from the sources' training parts (their rows tagged with a `source` column)."""
    if len(parts) == 1:
        return parts[0]
    if weights[0] is None:
        return datasets.concatenate_datasets(parts)
    total = sum(weights)
    # interleave_datasets takes each source's rows in order: shuffle first, so that a source cut short by
    # first_exhausted contributes a random subset of its rows rather than its first ones.
    shuffled = [part.shuffle(seed=seed + i, keep_in_memory=True) for i, part in enumerate(parts)]
    return datasets.interleave_datasets(shuffled, probabilities=[w / total for w in weights], seed=seed,
                                        stopping_strategy=strategy)


def mix_summary(mixed: datasets.Dataset, sources: list[DataSource]) -> str:
    """One line: how many training rows each source gave."""
    counts = [0] * len(sources)
    for i in mixed["source"]:
        counts[i] += 1
    total = max(1, len(mixed))
    return ", ".join(f"{n} from {s} ({100 * n / total:.1f}%)" for n, s in zip(counts, sources, strict=True))
