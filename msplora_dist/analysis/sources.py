"""Reading adapters into one common form: named factor pairs and, per layer, which pairs sum to its update.

Two kinds are understood, told apart by the files in the directory:

- MSPLoRA (msplora_config.json + adapter_model.safetensors, written by save_adapter): pairs
  global.{t}, mid.{g}.{t}, layer.{l}.{t}; layer l's update of t is the sum of its three levels.
- plain LoRA as PEFT saves it (adapter_config.json + adapter_model.safetensors with keys
  base_model.model.model.layers.{l}.<...>.{t}.lora_A.weight): one pair lora.{l}.{t} per layer, scale
  lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), alpha_pattern and rank_pattern honoured.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from msplora_dist.adapters.config import LEVELS, MSPLoRAConfig, group_of_layer
from msplora_dist.adapters.io import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config
from msplora_dist.errors import CheckpointError
from msplora_dist.utils.fileio import sha256_file

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"

_PEFT_KEY = re.compile(r"^(?P<module>(?:.*\.)?layers\.(?P<layer>\d+)\.(?:.*\.)?(?P<target>[^.]+))\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class Pair:
    """One low-rank update scale * B A, B and A as stored (factors() gives them in float64, scaled)."""

    key: str          # "global.q_proj", "mid.0.q_proj", "layer.3.q_proj", or "lora.3.q_proj"
    level: str        # "global" | "mid" | "layer" | "lora"
    target: str
    index: int | None  # the group (mid), the layer (layer, lora), None (global)
    rank: int
    scale: float
    B: torch.Tensor   # (out, r), unscaled
    A: torch.Tensor   # (r, in)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale * B, A) in float64."""
        return self.B.to(torch.float64) * self.scale, self.A.to(torch.float64)


@dataclass
class AdapterFactors:
    kind: str                                  # "msplora" | "lora"
    path: str | None
    num_layers: int
    targets: tuple[str, ...]
    features: dict[str, tuple[int, int]]       # target -> (in_features, out_features)
    pairs: dict[str, Pair]
    info: dict = field(default_factory=dict)   # JSON-ready description for the report
    groups: tuple[tuple[int, int], ...] | None = None

    def layer_pairs(self, layer: int, target: str) -> list[Pair]:
        """The pairs whose sum is layer `layer`'s update of `target` (empty: no update there)."""
        if self.kind == "lora":
            p = self.pairs.get(f"lora.{layer}.{target}")
            return [p] if p is not None else []
        keys = [f"global.{target}"]
        if self.groups:
            keys.append(f"mid.{group_of_layer(self.groups, layer)}.{target}")
        keys.append(f"layer.{layer}.{target}")
        return [self.pairs[k] for k in keys if k in self.pairs]

    def group_of(self, layer: int) -> int | None:
        return group_of_layer(self.groups, layer) if self.groups else None


def load_factors(path: str | os.PathLike) -> AdapterFactors:
    """Read an MSPLoRA or a PEFT LoRA adapter directory; CheckpointError for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"adapter directory {str(path)!r} does not exist; expected a directory written by save_adapter "
                              "or a PEFT LoRA adapter directory")
    if (path / CONFIG_NAME).is_file():
        return load_msplora_factors(path)
    if (path / PEFT_CONFIG_NAME).is_file():
        return load_lora_factors(path)
    raise CheckpointError(f"{str(path)!r} is not an adapter directory: it has neither {CONFIG_NAME} (MSPLoRA) "
                          f"nor {PEFT_CONFIG_NAME} (PEFT LoRA)")


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{str(file)!r} is missing; expected the adapter weights beside the adapter config")
    try:
        return load_file(file)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{str(file)!r} is not a readable safetensors file ({err})") from None


def load_msplora_factors(path: str | os.PathLike) -> AdapterFactors:
    path = Path(path)
    config, meta = read_adapter_config(path)
    weights = path / WEIGHTS_NAME
    state = _load_safetensors(weights)
    expected_sha = meta.get("weights_sha256")
    if expected_sha is not None and sha256_file(weights) != expected_sha:
        raise CheckpointError(f"{str(weights)!r} does not match the sha256 recorded in {CONFIG_NAME}; "
                              "the file is corrupt or was replaced")
    return msplora_factors(config, meta, state, str(path))


def msplora_factors(config: MSPLoRAConfig, meta: dict, state: dict[str, torch.Tensor], path: str | None) -> AdapterFactors:
    """Factors from a checkpoint's config, metadata and state dict (from disk, or adapter_state_dict(model))."""
    where = repr(path) if path else "the adapter"
    try:
        num_layers = int(meta["num_layers"])
        features = {t: (int(f[0]), int(f[1])) for t, f in meta["signature"]["features"].items()}
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise CheckpointError(f"{where}: metadata lacks num_layers or signature.features ({err!r})") from None
    config = config.with_groups(num_layers)
    missing_t = [t for t in config.target_modules if t not in features]
    if missing_t:
        raise CheckpointError(f"{where}: signature.features lacks targets {missing_t}")
    scales = [config.scale(i) for i in range(3)]
    expected: dict[str, tuple[str, int | None, str]] = {}
    for t in config.target_modules:
        if config.ranks[0]:
            expected[f"global.{t}"] = ("global", None, t)
        if config.ranks[1]:
            for g in range(len(config.groups)):
                expected[f"mid.{g}.{t}"] = ("mid", g, t)
        if config.ranks[2]:
            for layer in range(num_layers):
                expected[f"layer.{layer}.{t}"] = ("layer", layer, t)
    want = {f"{k}.lora_{ab}" for k in expected for ab in "AB"}
    missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
    if missing or unexpected:
        raise CheckpointError(f"{where}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    pairs = {}
    for key, (level, index, t) in expected.items():
        lv = LEVELS.index(level)
        r, (fin, fout) = config.ranks[lv], features[t]
        A, B = state[f"{key}.lora_A"], state[f"{key}.lora_B"]
        if tuple(A.shape) != (r, fin) or tuple(B.shape) != (fout, r):
            raise CheckpointError(f"{where}: {key} has lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}; "
                                  f"expected {(r, fin)} and {(fout, r)}")
        pairs[key] = Pair(key, level, t, index, r, scales[lv], B, A)
    info = {
        "kind": "msplora", "path": path, "num_layers": num_layers, "targets": list(config.target_modules),
        "features": {t: list(features[t]) for t in config.target_modules},
        "ranks": list(config.ranks), "alphas": list(config.alphas), "use_rslora": config.use_rslora,
        "scales": scales, "groups": [list(g) for g in config.groups],
    }
    return AdapterFactors("msplora", path, num_layers, tuple(config.target_modules),
                          {t: features[t] for t in config.target_modules}, pairs, info, tuple(config.groups))


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first key that matches the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_lora_factors(path: str | os.PathLike) -> AdapterFactors:
    path = Path(path)
    config_file = path / PEFT_CONFIG_NAME
    try:
        cfg = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise CheckpointError(f"{str(config_file)!r} is not valid JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{str(config_file)!r}: expected a JSON object")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise CheckpointError(f"{str(config_file)!r} has peft_type {cfg.get('peft_type')!r}; expected LORA")
    for flag, what in (("use_dora", "a DoRA adapter"), ("lora_bias", "a LoRA with a bias on lora_B")):
        if cfg.get(flag):
            raise CheckpointError(f"{str(config_file)!r} is {what} ({flag}); its update is not B A, expected plain LoRA")
    try:
        default_alpha = float(cfg.get("lora_alpha", 8))
    except (TypeError, ValueError):
        raise CheckpointError(f"{str(config_file)!r}: lora_alpha={cfg.get('lora_alpha')!r}; expected a number") from None
    use_rslora = bool(cfg.get("use_rslora", False))
    weights = path / PEFT_WEIGHTS_NAME
    if not weights.is_file() and (path / "adapter_model.bin").is_file():
        raise CheckpointError(f"{str(path)!r} holds adapter_model.bin; expected {PEFT_WEIGHTS_NAME} "
                              "(save with safe_serialization=True)")
    state = _load_safetensors(weights)

    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    modules: dict[tuple[int, str], str] = {}
    for key, tensor in state.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            continue
        lt = (int(m["layer"]), m["target"])
        found.setdefault(lt, {})[m["ab"]] = tensor
        modules[lt] = m["module"].removeprefix("base_model.model.")
    if not found:
        raise CheckpointError(f"{str(weights)!r} has no keys like base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight; "
                              "expected a PEFT LoRA adapter of a LLaMA-family model")
    pairs, features, alphas, ranks = {}, {}, {}, {}
    for (layer, t), ab in sorted(found.items()):
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{str(weights)!r}: layer {layer} {t} has lora_{''.join(ab)} only; expected lora_A and lora_B")
        A, B = ab["A"], ab["B"]
        r = A.shape[0]
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != r or r == 0:
            raise CheckpointError(f"{str(weights)!r}: layer {layer} {t} has lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}; "
                                  "expected (r, in) and (out, r)")
        feats = (A.shape[1], B.shape[0])
        if features.setdefault(t, feats) != feats:
            raise CheckpointError(f"{str(weights)!r}: {t} has (in, out) {feats} in layer {layer} and {features[t]} elsewhere")
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), modules[(layer, t)], default_alpha))
        scale = alpha / (math.sqrt(r) if use_rslora else r)
        key = f"lora.{layer}.{t}"
        pairs[key] = Pair(key, "lora", t, layer, r, scale, B, A)
        alphas.setdefault(t, set()).add(alpha)
        ranks.setdefault(t, set()).add(r)
    num_layers = 1 + max(layer for layer, _ in found)
    targets = tuple(sorted(features, key=_target_order))
    info = {
        "kind": "lora", "path": str(path), "num_layers": num_layers, "targets": list(targets),
        "features": {t: list(features[t]) for t in targets},
        "r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"), "use_rslora": use_rslora,
        "ranks": {t: sorted(ranks[t]) for t in targets},
        "scales": {t: sorted({pairs[k].scale for k in pairs if pairs[k].target == t}) for t in targets},
        "layers_adapted": {t: sorted(layer for layer, tt in found if tt == t) for t in targets},
    }
    return AdapterFactors("lora", str(path), num_layers, targets, features, pairs, info)


def _target_order(t: str) -> tuple[int, str]:
    order = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return (order.index(t) if t in order else len(order), t)
