"""The DeepSpeed config: read the JSON, fill every "auto" from the training values (here and nowhere else),
and refuse values that contradict them. Takes plain values, not the trainer's config object, so that
dist/ depends on nothing above it.

Precision: the only trainable tensors are the adapters, and DeepSpeed's bf16 mode would cast them (and so their
gradients, summed over every layer that shares them) to bf16. The engine therefore always runs DeepSpeed's fp32
mode (bf16.enabled false: the adapters are their own fp32 master, gradients accumulate in fp32), while the frozen
backbone is loaded in --dtype (bf16 on a GPU): `backbone_init_config` is the config ZeRO-3 builds it under.

Persistence: under ZeRO-3 the shared adapters must stay replicated on every rank (zero.persist_adapters marks
exactly those tensors, one by one). stage3_param_persistence_threshold then concerns the backbone alone: "auto"
is 0 (no backbone tensor replicated); an explicit value is DeepSpeed's own rule for the backbone.

One rank: ZeRO-3 there partitions nothing (a gather is a view of the one whole shard), so by default a ZeRO-3 config
without parameter offload runs DeepSpeed's stage 2 on one rank (single_rank_zero3="as_zero2": the same arithmetic,
without ZeRO-3's per-module hooks, which cost 4% of the step at the 7B shape once its trace settles, 20% over the
first ten steps, and 0.1 GB; docs/benchmarks.md). Kept at stage 3 (single_rank_zero3="keep"), two of its defaults
that only cost host time there are set where the config leaves them open (SINGLE_RANK_ZERO3). With several ranks,
or parameters offloaded, ZeRO-3 runs as configured.

Gradient bucket: reduce_bucket_size "auto" is BUCKET_ELEMENTS (absent: DeepSpeed's own default, 5e8). On one rank the
bucket only stages copies (the all-reduce is over one rank), and ZeRO allocates it whole (twice with overlap_comm,
in fp32), so it is smaller there.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from msplora_dist.errors import ConfigError

AUTO = "auto"


def read_ds_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--ds_config {str(path)!r}: no such file; expected a DeepSpeed JSON config such as ds_configs/zero3.json")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"--ds_config {str(path)!r} is not valid JSON: line {err.lineno}: {err.msg}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"--ds_config {str(path)!r}: expected a JSON object")
    return config


def _fill(section: dict, key: str, value, what: str, *, compare=None) -> None:
    """Set section[key] to value when missing or "auto"; else it must agree with value."""
    current = section.get(key, AUTO)
    if current == AUTO:
        section[key] = value
        return
    same = compare(current, value) if compare else current == value
    if not same:
        raise ConfigError(f"ds_config {what}={current!r} contradicts the training config, which gives {value!r}; "
                          "set it to \"auto\" or make the two agree")


SINGLE_RANK_ZERO3_CHOICES = ("as_zero2", "keep")
"""What a ZeRO-3 config does on one rank with its parameters on the GPU (see the module docstring)."""
BUCKET_ELEMENTS = {"several_ranks": 50_000_000, "one_rank": 10_000_000}
"""reduce_bucket_size for "auto". Several ranks: DeepSpeed's ZeRO-2 default order of size (fewer, larger all-reduces).
One rank: 1e7 fp32 elements (40 MB, twice with overlap_comm) instead of 5e7 saves 0.3 GB (8.01 -> 7.71 GB at the 7B
shape; its speed was not measured on its own): the adapters' gradients of a 7B model (4e7 elements) then flush in 4
copies a step instead of one."""


def check_single_rank_zero3(value: str) -> None:
    if value not in SINGLE_RANK_ZERO3_CHOICES:
        raise ConfigError(f"single_rank_zero3={value!r}: expected one of {', '.join(SINGLE_RANK_ZERO3_CHOICES)}")


def resolve_ds_config(raw: dict, *, micro_batch_size: int, grad_accum: int, world_size: int, lr: float,
                      weight_decay: float, max_grad_norm: float, dtype: str, load_universal: bool = False,
                      single_rank_zero3: str = "as_zero2") -> dict:
    """A complete DeepSpeed config for this run. dtype is the resolved 'bf16' or 'fp32'. load_universal:
    the run resumes a checkpoint written by another number of ranks (train.state.load_checkpoint).
    single_rank_zero3: one of SINGLE_RANK_ZERO3_CHOICES."""
    check_single_rank_zero3(single_rank_zero3)
    ds = copy.deepcopy(raw)
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    _fill(ds, "train_micro_batch_size_per_gpu", micro_batch_size, "train_micro_batch_size_per_gpu")
    _fill(ds, "gradient_accumulation_steps", grad_accum, "gradient_accumulation_steps")
    global_batch = micro_batch_size * grad_accum * world_size
    if ds.get("train_batch_size", AUTO) not in (AUTO, global_batch):
        raise ConfigError(
            f"ds_config train_batch_size={ds['train_batch_size']} but micro_batch_size x grad_accum x world size = "
            f"{micro_batch_size} x {grad_accum} x {world_size} = {global_batch}; set it to \"auto\" or make them agree"
        )
    ds["train_batch_size"] = global_batch
    _fill(ds, "gradient_clipping", max_grad_norm, "gradient_clipping", compare=lambda a, b: float(a) == float(b))

    if ds.get("fp16", {}).get("enabled") not in (None, False, AUTO):
        raise ConfigError("ds_config fp16.enabled=true: fp16 training is not supported; expected bf16 or fp32 (--dtype)")
    ds.setdefault("fp16", {})["enabled"] = False
    bf16 = ds.setdefault("bf16", {})
    _fill(bf16, "enabled", dtype == "bf16", "bf16.enabled")
    if bf16.get("check_grad_overflow") is False:
        # With it off DeepSpeed applies a NaN/inf gradient (stage_1_and_2.py); the trainer's skip relies on the check.
        raise ConfigError("ds_config bf16.check_grad_overflow=false would let a non-finite gradient into the adapters; "
                          "expected true or absent")
    # fp32 engine, bf16 (or fp32) backbone: see the module docstring. The backbone's dtype travels with --dtype.
    bf16["enabled"] = False
    if "data_types" in ds:
        raise ConfigError("ds_config has a 'data_types' section; the adapters always train and accumulate in fp32 "
                          "(--dtype sets the backbone): remove it")

    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if str(optimizer.get("type", "")).lower() not in ("adamw", "adam"):
        raise ConfigError(f"ds_config optimizer.type={optimizer.get('type')!r}: expected AdamW")
    params = optimizer.setdefault("params", {})
    _fill(params, "lr", lr, "optimizer.params.lr", compare=lambda a, b: float(a) == float(b))
    _fill(params, "weight_decay", weight_decay, "optimizer.params.weight_decay", compare=lambda a, b: float(a) == float(b))
    if "scheduler" in ds:
        raise ConfigError("ds_config has a 'scheduler' section; the trainer builds warmup + cosine from the training config "
                          "(--lr, warmup_ratio, min_lr_ratio): remove it")

    if "zero_optimization" not in ds:
        near = [k for k in ds if k.replace("_", "").lower().startswith("zero")]
        if near:  # a misspelt section would silently train without ZeRO's non-finite skip or partitioning
            raise ConfigError(f"ds_config has {near[0]!r} but no 'zero_optimization' section; expected 'zero_optimization'")
    zero = ds.setdefault("zero_optimization", {"stage": 2})
    if not isinstance(zero, dict):
        raise ConfigError(f"ds_config zero_optimization={zero!r}: expected an object such as {{\"stage\": 2}}")
    stage = zero.get("stage", 0)
    if stage not in (1, 2, 3):
        # DeepSpeed's ZeRO optimizers skip a step whose gradient norm is not finite; the trainer relies
        # on that to survive a bad batch (stage 0 would write NaN into the adapters).
        raise ConfigError(f"ds_config zero_optimization.stage={stage!r}: expected 1, 2 or 3 (ds_configs/zero2.json for one GPU)")
    if zero.get("compute_grad_norm") is False:
        raise ConfigError("ds_config zero_optimization.compute_grad_norm=false: the trainer needs the gradient norm to skip "
                          "non-finite steps; remove it")
    if stage == 3:
        _check_offload_paths(zero)
    if stage == 3 and world_size == 1 and single_rank_zero3 == "as_zero2" and stage2_can_run(zero):
        zero = ds["zero_optimization"] = as_stage2(zero)
        stage = 2
    if zero.get("reduce_bucket_size") == AUTO:
        zero["reduce_bucket_size"] = BUCKET_ELEMENTS["one_rank" if world_size == 1 else "several_ranks"]
    if stage == 3:
        if zero.get("stage3_param_persistence_threshold", AUTO) == AUTO:
            zero["stage3_param_persistence_threshold"] = 0  # the adapters are made persistent one by one instead
        if world_size == 1 and not _offloads_parameters(zero):
            _fill_single_rank_zero3(zero)
        for key in ("stage3_prefetch_bucket_size", "stage3_max_live_parameters", "stage3_max_reuse_distance"):
            if zero.get(key) == AUTO:
                del zero[key]  # DeepSpeed's own defaults
    ds.setdefault("steps_per_print", 10**9)  # the trainer logs; DeepSpeed's own prints would duplicate it
    ds.setdefault("wall_clock_breakdown", False)
    leftover = _find_auto(ds)
    if leftover:
        raise ConfigError(f"ds_config has \"auto\" at {leftover}, which the trainer does not fill; set a value there")
    return ds


# ZeRO-3 on one rank, parameters on the GPU: each tensor's one shard is the whole tensor, and DeepSpeed "gathers" it as a
# view of that shard (partition_parameters.py, _no_gather_coalesced) and "releases" it by dropping the view, so no
# setting here changes memory or arithmetic; they only spare host work. memory_efficient_linear: DeepSpeed's default
# replaces torch.nn.functional.linear, process-wide, with a Python autograd Function that re-gathers a released weight in
# the backward (linear.py), there being none to re-gather; stage3_max_reuse_distance: a layer released after its forward
# is fetched again for its recomputation and backward, for nothing.
SINGLE_RANK_ZERO3 = {"memory_efficient_linear": False, "stage3_max_reuse_distance": 2**62}


STAGE3_ONLY_KEYS = ("memory_efficient_linear", "module_granularity_threshold", "zero_hpz_partition_size", "zero_quantized_weights",
                    "zero_quantized_nontrainable_weights", "mics_shard_size", "mics_hierarchical_params_gather")
"""zero_optimization keys that mean something only under stage 3 (besides the stage3_* ones)."""


def stage2_can_run(zero: dict) -> bool:
    """Stage 2 runs what this ZeRO-3 section asks on one rank: no parameter offload, and no optimizer offload that only
    stage 3 has (NVMe, or a partial one: offload_optimizer.ratio < 1)."""
    optimizer = zero.get("offload_optimizer") or {}
    return (not _offloads_parameters(zero) and optimizer.get("device", "none") != "nvme"
            and float(optimizer.get("ratio", 1.0)) >= 1.0)


def as_stage2(zero: dict) -> dict:
    """A ZeRO-3 section as the stage-2 one a single rank runs: the shared keys (buckets, overlap_comm, optimizer offload)
    kept, the stage-3-only ones dropped (a leftover "auto" among them would otherwise be refused). Where DeepSpeed's
    defaults differ by stage, ZeRO-3's memory is kept: overlap_comm (on by default only at stage 3) stays on, and an
    absent reduce_bucket_size (one 5e8 bucket at stage 3, two at stage 2 with overlap) becomes the one-rank "auto"."""
    kept = {k: v for k, v in zero.items() if not k.startswith("stage3_") and k not in STAGE3_ONLY_KEYS}
    kept.setdefault("overlap_comm", True)
    kept.setdefault("reduce_bucket_size", AUTO)
    return kept | {"stage": 2}


def demoted_zero3(raw: dict, resolved: dict) -> bool:
    """The config asked for ZeRO-3 and this run resolved it to stage 2 (one rank, see the module docstring)."""
    return zero_stage(raw) == 3 and zero_stage(resolved) == 2


def _offloads_parameters(zero: dict) -> bool:
    """ZeRO-3 keeps the parameters on the CPU or NVMe: a gather is then a real copy onto the GPU, and a release frees it."""
    return (zero.get("offload_param") or {}).get("device", "none") not in ("none", None)


def _fill_single_rank_zero3(zero: dict) -> None:
    """The single-rank values of SINGLE_RANK_ZERO3 where the config leaves them to the trainer (absent or "auto");
    an explicit value is the user's."""
    for key, value in SINGLE_RANK_ZERO3.items():
        if zero.get(key, AUTO) == AUTO:
            zero[key] = value


def single_rank_zero3_note(ds: dict, demoted: bool = False) -> str:
    """The log line for a ZeRO-3 config on one rank: what the resolved config does there, and why."""
    if demoted:
        return ("note: ZeRO-3 on one rank partitions nothing (a gather is a view of the one whole shard), so this run uses "
                "DeepSpeed's stage 2: the same arithmetic, in no more memory, without ZeRO-3's per-module hooks "
                "(--single_rank_zero3 keep runs stage 3; with several ranks, or offload_param, ZeRO-3 runs as configured)")
    zero = ds["zero_optimization"]
    if _offloads_parameters(zero):
        return ("note: ZeRO-3 on one rank partitions nothing; it runs here for its parameter offload "
                f"({zero['offload_param']['device']}), which copies every layer onto the GPU before its use")
    said = {"memory_efficient_linear": "F.linear stays PyTorch's (memory_efficient_linear off)",
            "stage3_max_reuse_distance": "a layer stays fetched until its last use in the step (stage3_max_reuse_distance unbounded)"}
    applied = [said[key] for key, value in SINGLE_RANK_ZERO3.items() if zero.get(key) == value]
    kept = [key for key, value in SINGLE_RANK_ZERO3.items() if zero.get(key) != value]
    done = "; ".join(applied + ([f"the config's own {' and '.join(kept)} kept"] if kept else []))
    return (f"note: ZeRO-3 on one rank partitions nothing (a gather is a view of the one whole shard), so: {done}; its "
            "module hooks still cost host time: --single_rank_zero3 as_zero2 (the default) runs stage 2 (docs/benchmarks.md)")


def _check_offload_paths(zero: dict) -> None:
    """An NVMe offload needs its folder; DeepSpeed itself fails on a missing one with a traceback deep in its swapper."""
    for key in ("offload_param", "offload_optimizer"):
        section = zero.get(key) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"ds_config zero_optimization.{key}={section!r}: expected an object such as {{\"device\": \"cpu\"}}")
        if section.get("device") == "nvme":
            path = section.get("nvme_path")
            if not path or not Path(path).is_dir():
                raise ConfigError(f"ds_config zero_optimization.{key}.nvme_path={path!r}: expected an existing folder "
                                  "for the NVMe offload")


def backbone_init_config(ds: dict, dtype: str) -> dict:
    """The config ZeRO-3's zero.Init builds the partitioned backbone under: zero.Init takes its dtype from the bf16
    section, which the engine's config (fp32 mode, for the adapters) has off."""
    init = copy.deepcopy(ds)
    init["bf16"]["enabled"] = dtype == "bf16"
    return init


def _find_auto(node, path="") -> list[str]:
    if node == AUTO:
        return [path or "."]
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _find_auto(v, f"{path}.{k}" if path else k)]
    return []


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
