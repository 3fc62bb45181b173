"""Hugging Face Hub names for --model and --data, resolved by huggingface_hub and datasets themselves.

A name that is not a local path is looked up on the Hub: a model is downloaded into the Hugging Face cache
(HF_HOME / HF_HUB_CACHE) with huggingface_hub.snapshot_download, which is what from_pretrained does, so every
later step (the checks, the tokenizer, the backbone) sees a local directory; a dataset is read with
datasets.load_dataset. With HF_HUB_OFFLINE=1 both come from the cache only, and a name that is not there
is a one-line error naming it and HF_HUB_OFFLINE.
"""

from __future__ import annotations

import os
from pathlib import Path

from msplora_dist.errors import ConfigError, DataError, UserError

# What a training run needs of a model repository: configs, tokenizer files, chat templates. Weights are
# added separately so that a repository holding both safetensors and .bin files is downloaded once.
MODEL_FILES = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"]


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def is_hub_name(name: str) -> bool:
    """Whether `name` can be a Hub repository id (`org/name` or `name`); local paths are tried first by callers."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _unreachable(flag: str, name: str, kind: str, err: Exception, error: type[UserError]) -> UserError:
    if offline():
        return error(f"{flag} {name!r} is not a local path and is not in the Hugging Face cache, and HF_HUB_OFFLINE=1 "
                     f"forbids downloading it; expected a local {kind}, or a Hub name downloaded once online")
    reason = " ".join(str(err).split())[:300]
    return error(f"{flag} {name!r} is not a local path and could not be fetched from the Hugging Face Hub "
                 f"({type(err).__name__}: {reason}); expected a local {kind} or a Hub name you can access "
                 "(set HF_HUB_OFFLINE=1 to use the cache only)")


def resolve_model(name: str) -> Path:
    """A local model directory for --model: the path itself when it exists, else the Hub snapshot in the cache."""
    path = Path(name).expanduser()
    if path.exists() or not is_hub_name(name):
        return path  # check_model_dir says what is wrong with a local path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(name, allow_patterns=[*MODEL_FILES, "*.safetensors"]))
        if not any(snapshot.glob("*.safetensors")):  # an older repository with .bin weights only
            snapshot = Path(snapshot_download(name, allow_patterns=[*MODEL_FILES, "pytorch_model*.bin"]))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise _unreachable("--model", name, "model directory", err, ConfigError) from None
    return snapshot


def load_hub_dataset(name: str, split: str, subset: str | None):
    """datasets.load_dataset of a Hub dataset; offline, its prepared cache or the Hub snapshot in the cache."""
    import datasets
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return datasets.load_dataset(name, subset, split=split)
    except (ConnectionError, FileNotFoundError) as err:
        if not offline():
            raise _unreachable("--data", name, "file or folder", err, DataError) from None
        first = err
    # datasets reads only its own prepared cache offline; files downloaded by huggingface_hub (or laid out in
    # HF_HUB_CACHE by hand) are a folder of data files it reads like any local one.
    try:
        snapshot = snapshot_download(name, repo_type="dataset")
    except LocalEntryNotFoundError:
        raise _unreachable("--data", name, "file or folder", first, DataError) from None
    return load_data_folder(snapshot, split, subset, label=name)


def load_data_folder(folder: str | os.PathLike, split: str, subset: str | None, label: str):
    """A folder of data files (parquet, json, csv, ...), split by datasets' own file-name conventions."""
    import datasets

    try:
        return datasets.load_dataset(str(folder), subset, split=split)
    except ValueError as err:  # an unknown split, no data files
        raise DataError(f"data {label!r}: {' '.join(str(err).split())[:300]}") from None
