"""Everything that must know about ZeRO-3 partitioned parameters lives here.

A ZeRO-3 parameter outside a forward pass holds only this rank's shard: its .shape is (0,) or a
slice. Read sizes through full_shape/full_numel, and touch values only inside gathered().
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

from msplora_dist.adapters.inject import adapter_params, find_decoder_layers
from msplora_dist.adapters.layers import MSPLoRALinear


def is_zero3_param(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def full_shape(param: torch.Tensor) -> torch.Size:
    return param.ds_shape if is_zero3_param(param) else param.shape


def full_numel(param: torch.Tensor) -> int:
    return param.ds_numel if is_zero3_param(param) else param.numel()


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], *, modifier_rank: int | None = None) -> Iterator[None]:
    """Make the full values of `params` visible on every rank for the duration of the block.

    modifier_rank=None: read only. modifier_rank=k: what rank k writes is broadcast to the shards on exit.
    A no-op for ordinary tensors, so callers need not know whether ZeRO-3 is on.
    """
    zero_params = [p for p in params if is_zero3_param(p)]
    if not zero_params:
        yield
        return
    import deepspeed  # only reached when ZeRO-3 partitioned the parameters, so deepspeed is loaded

    with deepspeed.zero.GatheredParameters(zero_params, modifier_rank=modifier_rank):
        yield


def register_adapters_with_zero3(model: torch.nn.Module) -> None:
    """Tell ZeRO-3 which modules read adapter tensors they do not own (the shared pairs live in the hierarchy),
    so that those are gathered before the module's forward. ZeRO-3 fetches a module's own and external
    parameters before its forward; a leaf module (set_z3_leaf_layers, or a ds_config `leaf_module` entry)
    fetches its whole subtree but only its OWN external parameters. So each pair is registered with its
    MSPLoRALinear and with every ancestor up to the decoder layer: whichever of them is the leaf gathers it
    with its prefetch, rather than through ZeRO-3's blocking on-demand gather of a parameter read while absent.
    Once persistent (persist_adapters) they are gathered once per step and then stay replicated."""
    import deepspeed

    layers_name, layers = find_decoder_layers(model)
    for layer in layers:
        for name, module in layer.named_modules():
            if not isinstance(module, MSPLoRALinear):
                continue
            path = name.split(".")
            owners = [layer] + [layer.get_submodule(".".join(path[:i])) for i in range(1, len(path) + 1)]
            for owner in owners:
                for pair in module.pairs:
                    deepspeed.zero.register_external_parameter(owner, pair.lora_A)
                    deepspeed.zero.register_external_parameter(owner, pair.lora_B)


def set_z3_leaf_layers(model: torch.nn.Module) -> type:
    """Make every decoder layer a ZeRO-3 leaf module (DeepSpeed's deepspeed.utils.set_z3_leaf_modules): its
    parameters are fetched in one all-gather before the layer's forward (and its recomputation and backward)
    instead of one per projection and norm. On one H200, 7B shape, 4-bit: 5,000 -> 8,311-8,916 tokens/s.
    Call before deepspeed.initialize; returns the layer class."""
    from deepspeed.utils import set_z3_leaf_modules

    _, layers = find_decoder_layers(model)
    layer_cls = type(layers[0])
    set_z3_leaf_modules(model, [layer_cls])
    return layer_cls


def register_lm_head_with_zero3(model: torch.nn.Module) -> None:
    """A fused linear cross-entropy (Liger) reads lm_head.weight directly instead of calling lm_head's forward,
    so ZeRO-3's hooks on lm_head never gather it: register it with the root module, whose forward is hooked."""
    import deepspeed

    head = model.get_output_embeddings()
    deepspeed.zero.register_external_parameter(model, head.weight)


def persist_adapters(model: torch.nn.Module, optimizer=None) -> None:
    """After deepspeed.initialize under ZeRO-3: keep exactly the adapter tensors replicated, tensor by tensor.

    DeepSpeed 0.19.8 decides persistence by size alone (stage3_param_persistence_threshold and
    stage3_model_persistence_threshold, in parameter_offload.mark_persistent_parameters): a threshold high enough
    for the largest adapter also replicates every backbone tensor below it (on a 70B 4-bit model every packed k/v
    weight). It has no per-parameter setting, but everything downstream reads one flag per parameter, ds_persist:
    the coordinator never releases a parameter that has it (partitioned_param_coordinator.py), so it is gathered at
    its first use after each optimizer step (which partitions everything) and stays whole until the next. The
    ds_config sets the backbone's threshold to 0 unless the user chose one (ds_config.py); this sets the adapters'.

    With the ZeRO-3 optimizer given, the adapters also join its list of persistent parameters, which it gathers in
    one batched all-gather after every optimizer step (and around checkpoints), as it does for those it chose by
    size: otherwise each of the ~500 adapter tensors of a 7B model is fetched on its own at its first use in every
    step (one H200, 7B shape, 4-bit: the main command ran 6,224 tokens/s without the list and 7,378 with it, in two
    calls between which ZeRO-2 moved by 6%: docs/benchmarks.md).
    """
    params = [p for p in adapter_params(model).values() if is_zero3_param(p)]
    for param in params:
        param.ds_persist = True
    persistent = getattr(optimizer, "persistent_parameters", None)
    if isinstance(persistent, list):
        known = {id(p) for p in persistent}
        persistent.extend(p for p in params if id(p) not in known)


def check_adapters_replicated(model: torch.nn.Module, ds_config: dict) -> None:
    """After persist_adapters: under ZeRO-3 every adapter tensor is persistent (the gradient semantics and the
    replica digest need it) and no backbone tensor is persistent beyond the threshold the ds_config chose for it
    (which is 0 unless the user set one). Raises RuntimeError naming the first tensor that breaks either."""
    adapters = adapter_params(model)
    if not any(is_zero3_param(p) for p in adapters.values()):
        return
    partitioned = [name for name, p in adapters.items() if not getattr(p, "ds_persist", False)]
    if partitioned:
        raise RuntimeError(f"ZeRO-3 partitioned {len(partitioned)} adapter tensor(s) (first: {partitioned[0]}); they must stay "
                           "replicated: zero.persist_adapters was not applied")
    threshold = int(ds_config.get("zero_optimization", {}).get("stage3_param_persistence_threshold", 0))
    ours = {id(p) for p in adapters.values()}
    forced = [(name, p.ds_numel) for name, p in model.named_parameters()
              if id(p) not in ours and getattr(p, "ds_persist", False) and p.ds_numel > threshold]
    if forced:
        raise RuntimeError(f"ZeRO-3 replicates {len(forced)} backbone tensor(s) above stage3_param_persistence_threshold="
                           f"{threshold} (first: {forced[0][0]}, {forced[0][1]} elements); only the adapters may be forced")


def local_numel(param: torch.Tensor) -> int:
    """Elements this rank holds in memory now: under ZeRO-3 its shard (ds_tensor) plus whatever is
    gathered at the moment (nothing for a released parameter, everything for a persistent one)."""
    if is_zero3_param(param):
        return param.ds_tensor.numel() + param.data.numel()
    return param.numel()


def backbone_partition(model: torch.nn.Module, world: int, device: torch.device) -> dict:
    """How much of the frozen backbone each rank holds (collective). Under ZeRO-3 each rank keeps 1/world of
    every partitioned tensor; tensors at or below stage3_param_persistence_threshold (0 unless the ds_config sets
    one) are persistent, i.e. whole on every rank."""
    import torch.distributed as dist

    frozen = [p for p in model.parameters() if not p.requires_grad]
    persistent = sum(full_numel(p) for p in frozen if getattr(p, "ds_persist", False))
    local = torch.tensor([sum(local_numel(p) for p in frozen)], device=device)
    per_rank = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(per_rank, local)
    return {"full_numel": sum(full_numel(p) for p in frozen), "persistent_numel": persistent,
            "local_numel_per_rank": [int(t.item()) for t in per_rank]}
