"""Activation memory: what autograd keeps for the backward, and how many decoder layers to checkpoint to fit a budget.

--activation_memory_gb (a number of GB, or auto) makes the trainer checkpoint only as many decoder layers as the
budget needs, instead of all of them (--gradient_checkpointing true) or none. The pieces, each of which runs on a CPU:

* SavedTensorBytes counts the bytes autograd saves for the backward during a forward (saved_tensors_hooks), each
  storage once, leaving out the model's parameters and buffers: a frozen weight is saved for the input's gradient,
  but it is in memory anyway.
* probe() runs the built model once through the trainer's own loss on a synthetic batch of the run's shape
  (micro_batch_size x max_seq_len), every decoder layer checkpointed but the last, and splits what was saved into an
  ActivationProfile: one un-checkpointed layer, one checkpointed layer (its input, which the checkpoint keeps), the
  tensors every layer reads (rotary cos/sin, the attention mask) and everything outside the layers (embedding, final
  norm, lm_head and the loss).
* plan_checkpointing() picks the fewest layers to checkpoint whose estimated peak fits the budget, and
  set_checkpointed_layers() checkpoints the first k layers and no others.

GB are 2**30 bytes here, as in the trainer's peak_mem_gb.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import nn

from msplora_dist.adapters.inject import find_decoder_layers
from msplora_dist.errors import ConfigError
from msplora_dist.train.data import IGNORE_INDEX

GiB = 2**30
AUTO_MARGIN_FRACTION = 0.10
AUTO_MARGIN_BYTES = 4 * GiB
"""--activation_memory_gb auto spends the GPU's free memory (read once the engine holds the model and the optimizer)
less 10% of it and 4 GB more. The estimate counts what autograd saves and one layer's recomputation; the margin is
for what it does not count: the backward's own transients (the gradients flowing through a layer, ZeRO's gradient
buckets) and, without Liger's fused loss, the logits' transients (the bf16 logits, their fp32 copy and its
gradient beside the saved log-probabilities: ~6 more bytes per logit than counted, 1.6 GB at 4 x 2048 x 32k).
Measured on the H200 at the 7B shape with Liger (4 x 2048 tokens, 18 of 32 layers checkpointed): the peak was 3.0 GB
above the estimate plus what was allocated before it. So a numeric budget is a target for the saved activations,
not a cap on the peak: leave those ~3 GB (more without Liger) between it and the card."""


def gb(n_bytes: float) -> str:
    """A byte count for a log line: GB from 0.1 GB up, MB below (the tiny test model's activations are a few MB)."""
    return f"{n_bytes / GiB:.2f} GB" if n_bytes >= GiB / 10 else f"{n_bytes / 2**20:.1f} MB"


# ------------------------------------------------------------------------------------------ counting saved tensors

class SavedTensorBytes:
    """Inside `with SavedTensorBytes(exclude) as counter:`, every distinct storage that autograd saves for the backward,
    with its size and the region it was saved in (`counter.region`, set by the caller; "" by default).

    A storage counts once however many ops save it or views of it, and whole (a saved view keeps its whole storage
    alive). Storages of `exclude` (the model's parameters and buffers) are left out. The counted storages are held
    until the block ends, so that no address is reused for another tensor while counting. Inside a checkpointed
    region torch.utils.checkpoint's own hooks take the saved tensors (they are recomputed, not kept) and this counter
    sees only the inputs that the checkpoint keeps."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._exclude = list(exclude)
        self.storages: dict[int, tuple[int, str]] = {}
        """data_ptr -> (bytes, region)."""
        self.region = ""
        self._held: list = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def __enter__(self) -> SavedTensorBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._held.clear()

    @property
    def total(self) -> int:
        return sum(n for n, _ in self.storages.values())

    def bytes_of(self, ptrs: Iterable[int]) -> int:
        """The counted bytes of those storages (0 for one not counted)."""
        return sum(self.storages[p][0] for p in set(ptrs) if p in self.storages)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in self.storages and storage.nbytes() and not self._is_excluded(tensor, ptr):
            self.storages[ptr] = (storage.nbytes(), self.region)
            self._held.append(storage)
        return tensor

    def _is_excluded(self, tensor: torch.Tensor, ptr: int) -> bool:
        # A parameter (or a view of one, as F.linear saves weight.t()) has no autograd history; a tensor computed in
        # the forward from anything that needs a gradient has one. Only the former can be a weight: compare its
        # storage with the weights' as they are now (ZeRO-3 swaps a parameter's storage on every gather, so an
        # address is never remembered as a weight's).
        root = tensor if tensor._base is None else tensor._base
        if root.grad_fn is not None:
            return False
        return ptr in {t.untyped_storage().data_ptr() for t in self._exclude}


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def model_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The parameters and buffers of `model`: what SavedTensorBytes leaves out."""
    return [*model.parameters(), *model.buffers()]


def storage_ptrs(values) -> set[int]:
    """The storage addresses of every tensor in `values` (nested tuples, lists and dicts)."""
    if isinstance(values, torch.Tensor):
        return {values.untyped_storage().data_ptr()}
    if isinstance(values, dict):
        values = list(values.values())
    if isinstance(values, list | tuple):
        return set().union(*(storage_ptrs(v) for v in values)) if values else set()
    return set()


# ------------------------------------------------------------------------------------------ the profile and the plan

@dataclass(frozen=True)
class ActivationProfile:
    """What one forward saves for the backward, in bytes, split by where it is saved."""

    n_layers: int
    full: int
    """One decoder layer without checkpointing: every tensor its ops save (its input included)."""
    checkpointed: int
    """One checkpointed decoder layer: the input the checkpoint keeps to recompute the layer from."""
    shared: int
    """Tensors every layer reads (rotary cos/sin, the attention mask), saved once by the first un-checkpointed layer."""
    fixed: int
    """Everything outside the decoder layers: embedding, final norm, lm_head and the loss."""

    def saved(self, k: int) -> int:
        """The bytes saved at the end of the forward with the first k layers checkpointed, as SavedTensorBytes counts
        them (with every layer checkpointed the shared tensors are kept by the checkpoints, unseen by it; peak counts
        them)."""
        n = self.n_layers
        return self.fixed + k * self.checkpointed + (n - k) * self.full + (self.shared if k < n else 0)

    def peak(self, k: int) -> int:
        """The estimated activation peak with the first k layers checkpointed: the larger of the end of the forward and
        the backward's recomputation of a checkpointed layer (the checkpointed layers' inputs, one layer's saved tensors
        again, the shared tensors). The backward reaches the first k layers last, so by then the loss and the layers
        after them have freed theirs: one recomputation never adds to them (it would with the last k checkpointed).

        = max(fixed + (n - k) full, full if k else 0) + k checkpointed + shared."""
        n = self.n_layers
        return max(self.fixed + (n - k) * self.full, self.full if k else 0) + k * self.checkpointed + self.shared


def plan_checkpointing(profile: ActivationProfile, budget: int, *, setting: str, shape: tuple[int, int]) -> int:
    """The fewest layers to checkpoint (the first k) whose estimated peak fits `budget` bytes; a ConfigError naming the
    budget and the minimum when even every layer checkpointed does not. setting: the flag's value as the user gave it
    (for the message); shape: (micro_batch_size, max_seq_len)."""
    for k in range(profile.n_layers + 1):
        if profile.peak(k) <= budget:
            return k
    need = profile.peak(profile.n_layers)
    raise ConfigError(f"activation_memory_gb={setting}: the activations need at least {gb(need)} with every layer "
                      f"checkpointed at micro_batch_size {shape[0]} x max_seq_len {shape[1]}; raise it or lower those")


def set_checkpointed_layers(model: nn.Module, k: int) -> None:
    """Checkpoint the first k decoder layers and run the others as they are. Needs checkpointing enabled on the model
    (load_backbone(gradient_checkpointing=True): non-reentrant, every layer); transformers' GradientCheckpointingLayer
    then checks each layer's own `gradient_checkpointing` attribute at every call, so this is per layer.

    The first k rather than the last or spread: the same layers are recomputed whichever they are, so the speed is the
    same, and the backward recomputes the first ones after the others have freed their activations (peak())."""
    _, layers = find_decoder_layers(model)
    for i, layer in enumerate(layers):
        if not hasattr(layer, "_gradient_checkpointing_func"):
            raise RuntimeError(f"decoder layer {i} ({type(layer).__name__}) has no checkpointing function: enable "
                               "checkpointing on the model first (load_backbone(gradient_checkpointing=True))")
        layer.gradient_checkpointing = i < k


def checkpointed_layers(model: nn.Module) -> int:
    """How many decoder layers are checkpointed now."""
    _, layers = find_decoder_layers(model)
    return sum(bool(getattr(layer, "gradient_checkpointing", False)) for layer in layers)


# ------------------------------------------------------------------------------------------ the probe

def synthetic_batch(micro_batch_size: int, max_seq_len: int, vocab_size: int, *, packing: bool) -> dict:
    """A batch of the run's largest shape, with the keys data.collate gives: packed rows carry position_ids (two
    documents a row), others an attention mask with one padded token, so that the model builds its padding mask as
    it does for most real batches. Fixed token ids (own generator): no data, no global random state."""
    shape = (micro_batch_size, max_seq_len)
    input_ids = torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    if packing:
        half = max_seq_len // 2
        row = torch.cat([torch.arange(half), torch.arange(max_seq_len - half)])
        return {"input_ids": input_ids, "labels": labels, "position_ids": row.expand(shape).clone()}
    attention_mask = torch.ones(shape, dtype=torch.long)
    attention_mask[-1, -1] = 0
    labels[attention_mask == 0] = IGNORE_INDEX
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def probe(model: nn.Module, loss_fn: Callable[[dict], torch.Tensor], batch: dict) -> ActivationProfile:
    """The ActivationProfile of `model` on `batch`, from one forward of loss_fn(batch) (the trainer's loss, through the
    engine) in training mode with every decoder layer checkpointed but the last. No backward: the graph is dropped.
    The layers' checkpointing flags are restored after and the model is left in training mode; the random state is
    untouched (dropout draws from a fork)."""
    _, layers = find_decoder_layers(model)
    before = [getattr(layer, "gradient_checkpointing", False) for layer in layers]
    counter = SavedTensorBytes(model_tensors(model))
    inputs: list[set[int]] = [set() for _ in layers]  # the storages of each layer's positional inputs
    input_bytes: list[int] = [0] * len(layers)
    shared: set[int] = set()
    full_layer = layers[-1]

    def before_layer(i):
        def hook(module, args, kwargs):
            # The hidden states come positionally (what a checkpoint keeps); cos/sin and the mask as keywords.
            tensors = [a for a in (*args, kwargs.get("hidden_states")) if isinstance(a, torch.Tensor)]
            inputs[i] = {t.untyped_storage().data_ptr() for t in tensors}
            input_bytes[i] = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
            if module is full_layer:
                shared.update(storage_ptrs(kwargs))
                counter.region = "layer"
        return hook

    def after_full_layer(module, args, output):
        counter.region = ""

    handles = [layer.register_forward_pre_hook(before_layer(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(full_layer.register_forward_hook(after_full_layer))
    set_checkpointed_layers(model, len(layers) - 1)
    model.train()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices), counter, torch.enable_grad():
            loss = loss_fn(batch)
            del loss
    finally:
        for handle in handles:
            handle.remove()
        for layer, flag in zip(layers, before, strict=True):
            layer.gradient_checkpointing = flag
    shared_bytes = counter.bytes_of(shared)
    full = sum(n for ptr, (n, region) in counter.storages.items() if region == "layer" and ptr not in shared)
    kept = counter.bytes_of(set().union(*inputs[:-1])) if len(layers) > 1 else 0
    return ActivationProfile(n_layers=len(layers), full=full, checkpointed=max(input_bytes), shared=shared_bytes,
                             fixed=counter.total - full - shared_bytes - kept)


# ------------------------------------------------------------------------------------------ the budget

def parse_budget(setting: str) -> float | None:
    """GB from a validated --activation_memory_gb (config.py), None for auto."""
    return None if setting == "auto" else float(setting)


def free_device_bytes(device: torch.device) -> int:
    """What this process can still allocate on `device`: the driver's free memory plus what torch's caching allocator
    holds unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def auto_budget(available: int) -> int:
    """The activation budget of --activation_memory_gb auto from the bytes available (AUTO_MARGIN_FRACTION/BYTES)."""
    return max(0, int(available * (1 - AUTO_MARGIN_FRACTION)) - AUTO_MARGIN_BYTES)


def agree_across_ranks(profile: ActivationProfile, budget: int, device: torch.device) -> tuple[ActivationProfile, int]:
    """Every rank must checkpoint the same layers (under ZeRO-3 a recomputed layer gathers its weights again, a
    collective): the largest measurement of any rank and the smallest budget (auto reads each GPU's own free memory)."""
    if not (dist.is_available() and dist.is_initialized()):
        return profile, budget
    values = torch.tensor([profile.full, profile.checkpointed, profile.shared, profile.fixed, -budget],
                          dtype=torch.int64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    full, checkpointed, shared, fixed, neg_budget = (int(v) for v in values.tolist())
    return ActivationProfile(profile.n_layers, full, checkpointed, shared, fixed), -neg_budget


@dataclass(frozen=True)
class MemoryPlan:
    """The outcome of --activation_memory_gb: the budget, the profile it was planned on and the layers checkpointed."""

    setting: str
    budget: int
    profile: ActivationProfile
    checkpointed_layers: int
    allocated_before: int | None = None
    """Bytes the GPU held when the budget was read (model, optimizer): the run's peak minus this is its activations."""

    @property
    def estimate(self) -> int:
        return self.profile.peak(self.checkpointed_layers)

    def describe(self) -> str:
        p, source = self.profile, "" if self.setting != "auto" else " (auto: free GPU memory less the margin)"
        return (f"memory budget: {gb(self.budget)} of activations{source} -> {self.checkpointed_layers} of {p.n_layers} "
                f"layers checkpointed (est. {gb(self.estimate)}; per layer {gb(p.full)} full / {gb(p.checkpointed)} "
                "checkpointed)")

    def to_dict(self) -> dict:
        """For summary.json: the budget, the layers and the estimate in GB, and the profile in bytes."""
        return {"setting": self.setting, "budget_gb": self.budget / GiB, "checkpointed_layers": self.checkpointed_layers,
                "num_layers": self.profile.n_layers, "estimate_gb": self.estimate / GiB,
                "allocated_before_gb": None if self.allocated_before is None else self.allocated_before / GiB,
                "profile_bytes": asdict(self.profile)}


def fit_activation_budget(model: nn.Module, loss_fn: Callable[[dict], torch.Tensor], *, setting: str,
                          micro_batch_size: int, max_seq_len: int, packing: bool, device: torch.device) -> MemoryPlan:
    """Read the budget, probe the model, plan, and checkpoint the planned layers (collective: every rank calls it).
    Call it once the engine exists: `auto` reads the memory left beside the model and the optimizer, and the probe runs
    the model as training does (on its device, with ZeRO's hooks and the run's kernels)."""
    gigabytes = parse_budget(setting)
    budget = auto_budget(free_device_bytes(device)) if gigabytes is None else int(gigabytes * GiB)
    allocated = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    batch = synthetic_batch(micro_batch_size, max_seq_len, model.config.vocab_size, packing=packing)
    profile, budget = agree_across_ranks(probe(model, loss_fn, batch), budget, device)
    shown = setting if gigabytes is not None else f"auto ({gb(budget)}: the GPU's free memory less the margin)"
    k = plan_checkpointing(profile, budget, setting=shown, shape=(micro_batch_size, max_seq_len))
    set_checkpointed_layers(model, k)
    return MemoryPlan(setting, budget, profile, k, allocated)

