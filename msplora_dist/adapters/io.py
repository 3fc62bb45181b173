"""The adapter checkpoint: a directory with

    adapter_model.safetensors  global.{t}.lora_A/B, mid.{g}.{t}.lora_A/B, layer.{l}.{t}.lora_A/B, each once
    msplora_config.json        the MSPLoRAConfig, explicit group ranges, the base model's signature and, when
                               the writer knows it, the base model's path (base_model)

Written atomically: into a temporary sibling directory, fsynced, then renamed over the target, so a
reader sees the old adapter or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from msplora_dist.adapters.config import MSPLoRAConfig
from msplora_dist.adapters.inject import apply_msplora, get_hierarchy, signature_for
from msplora_dist.errors import CheckpointError
from msplora_dist.utils.fileio import sha256_file, write_dir_atomically

# How a caller lets these functions see tensors that a sharded engine partitions: a context-manager factory
# gather(params, modifier_rank=None) with the contract of msplora_dist.dist.zero.gathered. The method knows
# nothing of ZeRO; the trainer passes dist.zero.gathered, everyone else gets this no-op.
Gather = Callable[..., contextlib.AbstractContextManager]


def no_gather(params, *, modifier_rank: int | None = None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


FORMAT_VERSION = 1
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "msplora_config.json"


def adapter_state_dict(model: nn.Module, *, gather: Gather = no_gather) -> dict[str, torch.Tensor]:
    """The hierarchy's tensors under their checkpoint keys, full (through `gather`), on CPU."""
    hierarchy = get_hierarchy(model)
    params = dict(hierarchy.named_parameters())
    with gather(params.values()):
        return {k: p.detach().to("cpu", copy=True).contiguous() for k, p in params.items()}


def adapter_metadata(model: nn.Module, base_model: str | os.PathLike | None = None) -> dict:
    h = get_hierarchy(model)
    meta = {"format_version": FORMAT_VERSION}
    meta.update(h.config.to_dict())
    meta["num_layers"] = h.num_layers
    meta["signature"] = h.model_signature
    if base_model is not None:  # what the export serves the adapter on when it is not told (adapters/export.py)
        meta["base_model"] = str(base_model)
    return meta


def save_adapter(model: nn.Module, path: str | os.PathLike, *, gather: Gather = no_gather,
                 base_model: str | os.PathLike | None = None) -> Path:
    """Write the adapter hierarchy of `model` to directory `path` (every rank may call it; under
    torch.distributed only rank 0 writes, after all ranks have gathered). base_model: the base model's local
    path (the trainer gives a Hub name's snapshot, or the GGUF file), recorded in msplora_config.json for the export
    and for the reader."""
    state = adapter_state_dict(model, gather=gather)
    meta = adapter_metadata(model, base_model)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return Path(path)

    def write(tmp: Path) -> None:
        # One metadata entry: safetensors writes the metadata map in hash order, random per save, so two would make
        # the bytes (and weights_sha256) of identical adapters differ. The format version is in CONFIG_NAME.
        save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        meta["weights_sha256"] = sha256_file(tmp / WEIGHTS_NAME)
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")

    return write_dir_atomically(path, write)


def read_adapter_config(path: str | os.PathLike) -> tuple[MSPLoRAConfig, dict]:
    """(config, full metadata) of the adapter directory `path`, with clear errors for a wrong path."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"adapter directory {str(path)!r} does not exist; expected a directory written by save_adapter")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise CheckpointError(
            f"{str(config_file)!r} is missing; expected an MSPLoRA adapter directory with {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    try:
        meta = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{str(config_file)!r} is not valid JSON ({err})") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{str(config_file)!r} has format_version {version!r}; expected {FORMAT_VERSION}")
    fields = ("ranks", "alphas", "num_mid_groups", "target_modules", "dropout", "use_rslora", "groups")
    missing = [f for f in (*fields, "num_layers", "signature") if f not in meta]
    if missing:
        raise CheckpointError(f"{str(config_file)!r} lacks {missing}")
    config = MSPLoRAConfig(**{f: meta[f] for f in fields})
    return config, meta


def read_adapter_weights(path: str | os.PathLike, meta: dict) -> dict[str, torch.Tensor]:
    """The tensors of adapter directory `path`, after checking the file against the sha256 that
    `meta` (its msplora_config.json) records."""
    weights_file = Path(path) / WEIGHTS_NAME
    if not weights_file.is_file():
        raise CheckpointError(f"{str(weights_file)!r} is missing; expected the adapter weights beside {CONFIG_NAME}")
    expected_sha = meta.get("weights_sha256")
    if expected_sha is not None and sha256_file(weights_file) != expected_sha:
        raise CheckpointError(
            f"{str(weights_file)!r} does not match the sha256 recorded in {CONFIG_NAME}; the file is corrupt or was replaced"
        )
    try:
        return load_file(weights_file)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{str(weights_file)!r} is not a readable safetensors file ({reason})") from None


def _check_signature(ours: dict, meta: dict, path: Path) -> None:
    saved = meta["signature"]
    for key in ("model_type", "hidden_size", "num_layers"):
        if saved.get(key) != ours.get(key):
            raise CheckpointError(
                f"adapter {str(path)!r} was trained on a model with {key}={saved.get(key)!r}; "
                f"this model has {key}={ours.get(key)!r}"
            )
    for t, feats in saved["features"].items():
        if list(ours["features"].get(t, [])) != list(feats):
            raise CheckpointError(
                f"adapter {str(path)!r}: target {t!r} has (in, out) features {feats}; this model has {ours['features'].get(t)}"
            )


def load_adapter(model: nn.Module, path: str | os.PathLike, *, gather: Gather = no_gather) -> nn.Module:
    """Load an adapter directory into `model`, applying MSPLoRA from the saved config first if the
    model has none. The model must match the saved signature and, if it has adapters, their layout."""
    path = Path(path)
    config, meta = read_adapter_config(path)
    existing = get_hierarchy(model, required=False)
    if existing is None:
        ours = signature_for(model, config.target_modules)  # check before apply_msplora changes the model
    else:
        mine, theirs = existing.config.to_dict(), config.to_dict()
        for key in ("ranks", "target_modules", "groups", "alphas", "use_rslora"):
            if mine[key] != theirs[key]:
                raise CheckpointError(f"adapter {str(path)!r} has {key}={theirs[key]}; the model's adapters have {key}={mine[key]}")
        ours = existing.model_signature
    _check_signature(ours, meta, path)

    state = read_adapter_weights(path, meta)
    weights_file = path / WEIGHTS_NAME
    if existing is None:
        model = apply_msplora(model, config)
    params = dict(get_hierarchy(model).named_parameters())
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise CheckpointError(f"{str(weights_file)!r}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    with gather(params.values(), modifier_rank=0), torch.no_grad():
        for key, param in params.items():  # all checked before any is written
            if tuple(state[key].shape) != tuple(param.shape):
                raise CheckpointError(f"{str(weights_file)!r}: {key} has shape {tuple(state[key].shape)}; expected {tuple(param.shape)}")
        for key, param in params.items():
            param.copy_(state[key].to(device=param.device, dtype=param.dtype))
    return model
