"""Injecting the MSPLoRA hierarchy into a LLaMA-family model (Llama, Mistral, Qwen2 layout).

    model = apply_msplora(model, MSPLoRAConfig(...))

finds the decoder layers, wraps each target projection in an MSPLoRALinear, and attaches one
MSPLoRAHierarchy at `model.msplora` that owns every adapter tensor; its state_dict keys are exactly the
checkpoint's (global.q_proj.lora_A, mid.0.q_proj.lora_B, layer.3.q_proj.lora_A, ...).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from msplora_dist.adapters.config import LEVELS, MSPLoRAConfig, group_of_layer
from msplora_dist.adapters.layers import LoRAPair, MSPLoRALinear, base_features
from msplora_dist.errors import ConfigError

HIERARCHY_ATTR = "msplora"


class MSPLoRAHierarchy(nn.Module):
    """Owner of every adapter tensor: global[t], mid[g][t], layer[l][t], each a LoRAPair."""

    def __init__(self, config: MSPLoRAConfig, num_layers: int, features: dict[str, tuple[int, int]],
                 model_signature: dict, *, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        assert config.groups is not None, "config.with_groups(num_layers) first"
        self.config = config
        self.num_layers = num_layers
        self.features = dict(features)
        self.model_signature = dict(model_signature)
        rank_g, rank_m, rank_l = config.ranks

        def pairs(rank: int) -> nn.ModuleDict:
            return nn.ModuleDict({
                t: LoRAPair(*self.features[t], rank, init_lora_weights=config.init_lora_weights,
                            dtype=dtype, device=device)
                for t in config.target_modules} if rank > 0 else {})

        self.add_module("global", pairs(rank_g))
        self.mid = nn.ModuleList([pairs(rank_m) for _ in config.groups]) if rank_m > 0 else nn.ModuleList()
        self.layer = nn.ModuleList([pairs(rank_l) for _ in range(num_layers)]) if rank_l > 0 else nn.ModuleList()

    def pairs_for(self, layer: int, target: str) -> tuple[LoRAPair | None, LoRAPair | None, LoRAPair | None]:
        """The (global, mid, layer) pairs that layer `layer`'s `target` projection uses."""
        glob = getattr(self, "global")
        g = group_of_layer(self.config.groups, layer)
        return (glob[target] if len(glob) else None,
                self.mid[g][target] if len(self.mid) else None,
                self.layer[layer][target] if len(self.layer) else None)

    def named_pairs(self) -> Iterator[tuple[str, LoRAPair]]:
        """('global.q_proj', pair), ('mid.0.q_proj', pair), ('layer.3.q_proj', pair), ..."""
        for name, module in self.named_modules():
            if isinstance(module, LoRAPair):
                yield name, module

    def forward(self, *args, **kwargs):
        raise RuntimeError("MSPLoRAHierarchy only owns the adapter tensors; call the model, not the hierarchy")


def find_decoder_layers(model: nn.Module, targets: tuple[str, ...] = ()) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder layers (model.model.layers for LlamaForCausalLM and its relatives)."""
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and name.split(".")[-1] in ("layers", "h", "blocks"):
            candidates.append((name, module))
    if not candidates:
        raise ConfigError(
            f"no decoder layers found in {type(model).__name__}: expected a LLaMA-family model with a "
            "ModuleList named 'layers' (model.model.layers)"
        )
    if targets:
        with_targets = [(n, m) for n, m in candidates
                        if any(_find_target(m[0], t, required=False) is not None for t in targets)]
        candidates = with_targets or candidates
    return max(candidates, key=lambda nm: len(nm[1]))


def _find_target(layer: nn.Module, target: str, *, required: bool = True) -> tuple[nn.Module, str, nn.Module] | None:
    """(parent, child_name, module) of the unique submodule whose name ends in `target`."""
    found = [(name, module) for name, module in layer.named_modules() if name.split(".")[-1] == target]
    if not found:
        if not required:
            return None
        linears = sorted({n.split(".")[-1] for n, m in layer.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"target module {target!r} matches nothing in the decoder layers; expected one of {linears}")
    if len(found) > 1:
        raise ConfigError(f"target module {target!r} matches {[n for n, _ in found]} in one layer; expected exactly one")
    name, module = found[0]
    parent = layer.get_submodule(name.rpartition(".")[0]) if "." in name else layer
    return parent, name.split(".")[-1], module


def model_signature(model: nn.Module, num_layers: int, features: dict[str, tuple[int, int]]) -> dict:
    """What an adapter must match to be loaded onto a model."""
    hf_config = getattr(model, "config", None)
    return {
        "model_type": getattr(hf_config, "model_type", type(model).__name__),
        "hidden_size": getattr(hf_config, "hidden_size", None),
        "num_layers": num_layers,
        "features": {t: list(f) for t, f in features.items()},
    }


def _find_targets(layers: nn.ModuleList, targets: tuple[str, ...]
                  ) -> tuple[dict[str, list[tuple[nn.Module, str, nn.Module]]], dict[str, tuple[int, int]]]:
    """(parent, child_name, module) of every target of every layer, and the (in, out) features of each target."""
    found: dict[str, list[tuple[nn.Module, str, nn.Module]]] = {t: [] for t in targets}
    for layer in layers:
        for t in targets:
            parent, child, module = _find_target(layer, t)
            if not isinstance(module, nn.Linear):
                raise ConfigError(f"target module {t!r} is a {type(module).__name__}; expected nn.Linear or bitsandbytes Linear4bit")
            found[t].append((parent, child, module))
    features = {}
    for t, entries in found.items():
        shapes = {base_features(m) for _, _, m in entries}
        if len(shapes) != 1:
            raise ConfigError(f"target module {t!r} has different shapes across layers {sorted(shapes)}; a shared adapter needs one shape")
        features[t] = shapes.pop()
    return found, features


def signature_for(model: nn.Module, targets: tuple[str, ...]) -> dict:
    """The model_signature that apply_msplora(model, config with these targets) would record; changes nothing."""
    _, layers = find_decoder_layers(model, targets)
    _, features = _find_targets(layers, targets)
    return model_signature(model, len(layers), features)


def apply_msplora(model: nn.Module, config: MSPLoRAConfig, *, adapter_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Wrap every target projection of every decoder layer; freeze every base parameter. In place."""
    if get_hierarchy(model, required=False) is not None:
        raise ConfigError(f"{type(model).__name__} already has an MSPLoRA hierarchy; apply_msplora once per model")
    _, layers = find_decoder_layers(model, config.target_modules)
    num_layers = len(layers)
    config = config.with_groups(num_layers)
    found, features = _find_targets(layers, config.target_modules)

    for p in model.parameters():
        p.requires_grad_(False)
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), None)
    hierarchy = MSPLoRAHierarchy(config, num_layers, features, model_signature(model, num_layers, features),
                                 dtype=adapter_dtype, device=device)
    scales = tuple(config.scale(i) for i in range(len(LEVELS)))
    for t, entries in found.items():
        for layer_idx, (parent, child, base) in enumerate(entries):
            wrapped = MSPLoRALinear(base, hierarchy.pairs_for(layer_idx, t), scales, config.dropout)
            wrapped.layer_index, wrapped.target = layer_idx, t
            wrapped.train(base.training)  # a new Module starts in train mode: no adapter dropout on an eval model
            setattr(parent, child, wrapped)
    hierarchy.train(model.training)
    model.add_module(HIERARCHY_ATTR, hierarchy)
    return model


def get_hierarchy(model: nn.Module, *, required: bool = True) -> MSPLoRAHierarchy | None:
    hierarchy = getattr(model, HIERARCHY_ATTR, None)
    if hierarchy is None and hasattr(model, "module"):  # a DeepSpeed engine or DDP wrapper
        hierarchy = getattr(model.module, HIERARCHY_ATTR, None)
    if required and not isinstance(hierarchy, MSPLoRAHierarchy):
        raise ConfigError(f"{type(model).__name__} has no MSPLoRA adapters; call apply_msplora first")
    return hierarchy


def msplora_linears(model: nn.Module) -> Iterator[MSPLoRALinear]:
    for module in model.modules():
        if isinstance(module, MSPLoRALinear):
            yield module


def adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every trainable adapter tensor once, under its checkpoint key (the torchtune-style protocol)."""
    return dict(get_hierarchy(model).named_parameters())


def merge_adapter(model: nn.Module, *, keep_original: bool = True) -> None:
    for module in msplora_linears(model):
        module.merge(keep_original=keep_original)


def unmerge_adapter(model: nn.Module) -> None:
    for module in msplora_linears(model):
        module.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every update into its base weight and return the plain model (no MSPLoRA modules left)."""
    hierarchy = get_hierarchy(model)
    _, layers = find_decoder_layers(model)
    for layer in layers:
        for name, module in list(layer.named_modules()):
            if isinstance(module, MSPLoRALinear):
                module.merge(keep_original=False)
                parent = layer.get_submodule(name.rpartition(".")[0]) if "." in name else layer
                setattr(parent, name.split(".")[-1], module.base_layer)
    del model._modules[HIERARCHY_ATTR]
    del hierarchy
    return model


@dataclass
class ParamReport:
    per_level: dict[str, int]
    per_target: dict[str, dict[str, int]]
    total: int
    lora_same_rank: int
    lora_same_rank_r: int
    lora_max_rank: int
    lora_max_rank_r: int

    def __str__(self) -> str:
        lines = ["MSPLoRA trainable parameters"]
        for level, n in self.per_level.items():
            lines.append(f"  {level:<7} {n:>14,}")
        lines.append(f"  {'total':<7} {self.total:>14,}")
        lines.append(f"  plain LoRA r={self.lora_same_rank_r} (same rank per layer): {self.lora_same_rank:,} "
                     f"({self.total / self.lora_same_rank:.2f}x)")
        lines.append(f"  plain LoRA r={self.lora_max_rank_r} (the largest level rank): {self.lora_max_rank:,} "
                     f"({self.total / self.lora_max_rank:.2f}x)")
        return "\n".join(lines)


def count_params(config: MSPLoRAConfig, num_layers: int, features: dict[str, tuple[int, int]]) -> ParamReport:
    """sum_t (in_t + out_t) * (r_G + G r_M + L r_L), per level and target, against plain LoRA."""
    config = config.with_groups(num_layers)
    multiplicity = (1, len(config.groups), num_layers)
    per_target = {t: {LEVELS[i]: (i_f + o_f) * config.ranks[i] * multiplicity[i] for i in range(3)}
                  for t, (i_f, o_f) in features.items()}
    per_level = {lv: sum(per_target[t][lv] for t in features) for lv in LEVELS}
    width = sum(i_f + o_f for i_f, o_f in features.values())
    r_max = max(config.ranks)
    return ParamReport(per_level, per_target, sum(per_level.values()),
                       width * config.total_rank * num_layers, config.total_rank,
                       width * r_max * num_layers, r_max)


def param_report(model: nn.Module) -> ParamReport:
    h = get_hierarchy(model)
    report = count_params(h.config, h.num_layers, h.features)
    actual = sum(p.numel() for p in h.parameters())  # replicated on every rank, also under ZeRO-3
    if actual != report.total:
        raise AssertionError(f"hierarchy holds {actual} parameters, the formula gives {report.total}")
    return report
