"""TrainConfig: every knob of launch/train.py, typed, documented and validated in one place.

Values come from the dataclass defaults (the embedded default run: the tiny model and data shipped in
msplora_dist/assets), then an optional YAML file (--config), then command-line flags, in that order.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from msplora_dist.adapters.config import ALL_LINEAR_TARGETS, MSPLoRAConfig
from msplora_dist.dist.ds_config import check_single_rank_zero3
from msplora_dist.errors import ConfigError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
REPO_ROOT = Path(__file__).resolve().parents[2]
# transformers' attention back-ends (None: its default) and the package each needs beyond torch.
MAX_LR = 1.0
AUTO_TRUE_FALSE = ("auto", "true", "false")  # --liger, --compile_layers: auto = where it applies
"""The largest --lr accepted."""

# interleave_datasets' stopping strategies for a weighted mix of several data sources.
MIX_STRATEGIES = ("first_exhausted", "all_exhausted", "all_exhausted_without_replacement")
ATTN_IMPLEMENTATIONS = {None: None, "eager": None, "sdpa": None, "flex_attention": None,
                        "flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


# --help's sections, in order; each field names its own (grouped below), so a new field is one place to edit.
HELP_GROUPS = {
    "run": "Run (launch with `deepspeed launch/train.py ...`; `python launch/train.py` runs one process)",
    "model": "Model",
    "adapter": "Adapter (MSPLoRA)",
    "data": "Data",
    "optimisation": "Optimisation",
    "checkpointing": "Checkpointing and output",
    "logging": "Evaluation and logging",
}
REPORT_BACKENDS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
"""--report_to values and the package each needs."""


def grouped(group: str, default):
    """A field in --help section `group` (a key of HELP_GROUPS)."""
    return field(default=default, metadata={"group": group})


@dataclass(frozen=True)
class DataSource:
    """One data source of --data / --eval_data: a local .json/.jsonl/.parquet file, a datasets save_to_disk
    folder, a folder of data files, or a Hugging Face Hub dataset name. Written `PATH` or `PATH:WEIGHT` on the
    command line (several joined by commas), or as a YAML mapping with any of the fields below."""

    path: str
    """The file, folder or hub dataset name."""
    weight: float | None = None
    """Mixing weight: with several sources, each training row is drawn from source i with probability
    weight_i / sum(weights) (datasets.interleave_datasets). No weights: the sources are concatenated."""
    split: str = "train"
    """The split to read from a hub dataset or a folder of data files."""
    subset: str | None = None
    """The configuration (subset) name of a hub dataset that has several."""

    def __post_init__(self):
        if not self.path:
            raise ConfigError("data source with an empty path; expected a file, folder or hub dataset name")
        if self.weight is not None and not (self.weight > 0 and math.isfinite(self.weight)):
            raise ConfigError(f"data source {self.path!r}: weight={self.weight}; expected a positive number")

    def __str__(self) -> str:
        return self.path if self.weight is None else f"{self.path}:{self.weight:g}"

    @classmethod
    def parse(cls, name: str, value) -> DataSource:
        """From `PATH`, `PATH:WEIGHT` or a mapping {path, weight, split, subset}; errors name the field `name`."""
        if isinstance(value, DataSource):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
            if unknown or "path" not in value:
                raise ConfigError(f"{name}: a source {value!r} has fields {sorted(value)}; expected path and optionally "
                                  "weight, split, subset")
            try:
                weight = None if value.get("weight") is None else float(value["weight"])
            except (TypeError, ValueError):
                raise ConfigError(f"{name}: source {value['path']!r} has weight={value['weight']!r}; expected a number") from None
            return cls(str(value["path"]), weight, str(value.get("split") or "train"),
                       None if value.get("subset") is None else str(value["subset"]))
        text = str(value).strip()
        head, sep, tail = text.rpartition(":")
        try:
            weight = float(tail) if sep and head else None
        except ValueError:
            weight = None  # a colon that is part of the path
        return cls(text) if weight is None else cls(head, weight)


@dataclass
class TrainConfig:
    # --- what to train on -------------------------------------------------------------------------
    model: str = grouped("model", str(ASSETS / "tiny_llama"))
    """A LLaMA-family model (llama, mistral, qwen2, qwen3): a local Hugging Face model directory, a Hub name
    (downloaded into the Hugging Face cache; with HF_HUB_OFFLINE=1 taken from the cache only), or a .gguf file
    of one (or a directory holding exactly one; needs the [gguf] extra)."""
    data: tuple[DataSource, ...] = grouped("data", (DataSource(str(ASSETS / "data" / "instructions.jsonl")),))
    """Training data: one source or several, comma-separated, each a .json/.jsonl/.parquet file, a datasets
    folder or a Hub dataset name, with an optional mixing weight (a.jsonl:0.7,b.parquet:0.3; a YAML list of
    {path, weight, split, subset} too). Rows are alpaca (instruction, input, output), chat (messages:
    [{role, content}]), ShareGPT (conversations: [{from, value}]) or plain text (text); each source its own."""
    eval_data: tuple[DataSource, ...] = grouped("data", ())
    """Held-out data, sources as in `data` (concatenated, no weights); when unset, eval_fraction of each
    `data` source is held out."""
    eval_fraction: float = grouped("data", 0.1)
    """Share of each `data` source held out for evaluation when eval_data is unset (0 turns evaluation off)."""
    output_dir: str = grouped("checkpointing", "runs/default")
    """Where the final adapter ({output_dir}/adapter), checkpoints, TensorBoard logs and the resolved
    configs go."""
    ds_config: str = grouped("run", str(REPO_ROOT / "ds_configs" / "zero3.json"))
    """DeepSpeed JSON config; its "auto" values are filled from this config (see ds_config.py)."""
    single_rank_zero3: str = grouped("run", "as_zero2")
    """A ZeRO-3 config on one rank with its parameters on the GPU, where ZeRO-3 partitions nothing: as_zero2 = run
    DeepSpeed's stage 2 (the same arithmetic in no more memory, without ZeRO-3's per-module hooks: 4% of the step at the 7B
    shape once settled, docs/benchmarks.md); keep = run stage 3, for a run whose checkpoints are to be resumed on several
    ranks under ZeRO-3 (DeepSpeed's universal format does not carry stage 2's optimizer state to stage 3). Several
    ranks, or offload_param: ZeRO-3 as configured."""

    # --- schedule -----------------------------------------------------------------------------------
    max_steps: int = grouped("optimisation", -1)
    """Optimizer steps to run; -1 derives it from `epochs`."""
    epochs: float = grouped("optimisation", 4.0)
    """Passes over the training data when max_steps is -1."""
    micro_batch_size: int = grouped("optimisation", 8)
    """Examples per rank per forward pass."""
    grad_accum: int = grouped("optimisation", 1)
    """Micro-batches accumulated per optimizer step. Global batch = micro x accum x world size."""
    lr: float = grouped("optimisation", 3e-3)
    """Peak learning rate of the adapters."""
    warmup_ratio: float = grouped("optimisation", 0.05)
    """Share of max_steps spent warming the learning rate up linearly from 0."""
    min_lr_ratio: float = grouped("optimisation", 0.1)
    """The cosine schedule decays to lr * min_lr_ratio at max_steps."""
    weight_decay: float = grouped("optimisation", 0.0)
    """AdamW weight decay of the adapters."""
    max_grad_norm: float = grouped("optimisation", 1.0)
    """Gradient clipping on the global norm (0 turns it off)."""
    seed: int = grouped("optimisation", 0)
    """Seeds adapter init, data order and dropout."""

    # --- backbone -----------------------------------------------------------------------------------
    dtype: str = grouped("model", "auto")
    """bf16 or fp32 for activations and the frozen backbone; auto = bf16 on a GPU, fp32 on a CPU."""
    load_in_4bit: bool = grouped("model", False)
    """Quantize the frozen backbone to 4-bit NF4 (double quantization) with bitsandbytes, QLoRA-style."""
    gradient_checkpointing: bool = grouped("model", False)
    """Recompute decoder-layer activations in backward (non-reentrant) to save memory: every layer, or none."""
    activation_memory_gb: str | None = grouped("model", None)
    """Activation memory to spend, in GB (2**30 bytes), or auto (the GPU's free memory once the model and optimizer are
    in place, less a tenth of it and 4 GB): the trainer measures one decoder layer's saved activations at micro_batch_size x
    max_seq_len and checkpoints the fewest layers (the first ones) whose estimate fits; a budget that even every layer
    checkpointed exceeds is an error. The budget is for the saved activations, not a cap on the peak: the backward's
    transients come on top (3 GB measured at the 7B shape with Liger). A budget governs checkpointing:
    gradient_checkpointing is not read. Unset: gradient_checkpointing decides."""
    attn_implementation: str | None = grouped("model", None)
    """Passed to from_pretrained (sdpa, flash_attention_2, eager); unset lets transformers choose."""
    liger: str = grouped("model", "auto")
    """Liger Kernel's fused RMSNorm, RoPE, SwiGLU and linear cross-entropy: auto = on a CUDA GPU when liger-kernel
    is installed and supports the model family; true = required; false = off."""
    compile_layers: str = grouped("model", "auto")
    """Run each decoder layer's forward through torch.compile (inductor), one graph shared by every layer, inside the
    gradient checkpoint so the recomputation runs it too (train/kernels.py). auto = on a CUDA GPU at ZeRO stage 1-2,
    which includes a ZeRO-3 config on one GPU (measured there: 1.03x the tokens/s at less memory at the 7B shape, 1.3-1.7x
    on SmolLM2-135M; docs/benchmarks.md); true = on, ZeRO-3 on several ranks too (it needs --zero3_leaf_layers true;
    tested on CPU, not yet measured on GPUs); false = off. With Liger on, Liger keeps only its fused linear cross-entropy (its Triton
    kernels do not trace; inductor fuses RMSNorm, RoPE and SwiGLU itself). The first step pays the compile (2-13 s
    measured), and the first batch of a new length one recompile (then shapes are dynamic)."""
    zero3_leaf_layers: bool = grouped("model", True)
    """ZeRO-3: fetch each decoder layer's weights in one all-gather (a DeepSpeed leaf module) instead of one per
    projection; exact, and about 1.7x faster on one GPU at the 7B shape."""

    # --- adapters -----------------------------------------------------------------------------------
    ranks: tuple[int, int, int] = grouped("adapter", (8, 4, 2))
    """Ranks of the (global, mid, layer) adapters; 0 switches a level off."""
    alphas: tuple[float, float, float] = grouped("adapter", (16.0, 16.0, 16.0))
    """LoRA alpha of each level."""
    num_mid_groups: int = grouped("adapter", 2)
    """Number of contiguous mid-level layer groups."""
    target_modules: tuple[str, ...] = grouped("adapter", ALL_LINEAR_TARGETS)
    """Projections to adapt in every decoder layer."""
    dropout: tuple[float, float, float] = grouped("adapter", (0.05, 0.05, 0.05))
    """Adapter dropout per level (one value sets all three)."""
    use_rslora: bool = grouped("adapter", False)
    """Scale alpha / sqrt(r) instead of alpha / r."""

    # --- data ---------------------------------------------------------------------------------------
    max_seq_len: int = grouped("data", 256)
    """Longer examples are truncated (and counted); with packing, the length of each packed row."""
    train_on_prompt: bool = grouped("data", False)
    """Also compute the loss on prompt tokens (default: response tokens only)."""
    packing: bool = grouped("data", False)
    """Pack several examples into each row of max_seq_len tokens (attention stays within an example)."""
    mix_strategy: str = grouped("data", "first_exhausted")
    """How a weighted mix of sources ends (datasets.interleave_datasets): first_exhausted (when a source runs
    out: no row repeats), all_exhausted (when every source has been seen whole: small sources repeat) or
    all_exhausted_without_replacement."""
    chat_template: str | None = grouped("data", None)
    """Chat template for chat and ShareGPT rows, replacing the tokenizer's: a Jinja file, or a built-in (default,
    chatml, llama3). Unset: the tokenizer's own, or `default` for a base model that has none."""
    data_cache: bool = grouped("data", True)
    """Cache the tokenized data (Arrow, memory-mapped): a later run, and every rank after the first, reuses it.
    The key covers the data files (path, size, mtime), the tokenizer files, the chat template, max_seq_len,
    train_on_prompt and the tokenizing code."""
    data_cache_dir: str | None = grouped("data", None)
    """Where the tokenized cache lives; unset: msplora_tokenized/ in the datasets cache (HF_DATASETS_CACHE)."""

    # --- checkpoints, evaluation and logging ---------------------------------------------------------
    save_steps: int = grouped("checkpointing", 0)
    """Write a checkpoint every save_steps optimizer steps (0: only at the end)."""
    keep_last: int = grouped("checkpointing", 2)
    """Checkpoints kept in {output_dir}/checkpoints; older ones are deleted."""
    eval_steps: int = grouped("logging", 20)
    """Evaluate every eval_steps optimizer steps (and at the end); 0: only at the end."""
    log_steps: int = grouped("logging", 1)
    """Write TensorBoard scalars every log_steps optimizer steps."""
    resume: str | None = grouped("checkpointing", None)
    """'latest' (the newest valid checkpoint in {output_dir}/checkpoints) or a checkpoint directory."""
    overwrite: bool = grouped("checkpointing", False)
    """Start afresh in an output_dir that holds another run's checkpoints or adapter (they are deleted).
    Without it such a directory is refused, so no run is lost by accident."""
    max_nonfinite_steps: int = grouped("optimisation", 3)
    """A step whose loss or gradient is not finite is skipped (no update) and counted; after this many
    in a row the run saves a checkpoint of the last good state and stops (0: never stop)."""
    analyze: bool = grouped("logging", True)
    """At the end, write the multi-scale analysis report to {output_dir}/analysis and log its scalars."""
    report_to: tuple[str, ...] = grouped("logging", ("tensorboard",))
    """Where the scalars (losses, learning rate, speed, eval, analysis) go: any of tensorboard ({output_dir}/tb),
    wandb (offline unless WANDB_MODE says otherwise, {output_dir}/wandb), mlflow (MLFLOW_TRACKING_URI, else the
    local store {output_dir}/mlflow.db); comma-separated, or none."""
    config: str | None = field(default=None, metadata={"cli_only": True, "group": "run"})
    """Optional YAML file of any of these fields; command-line flags override it."""

    def __post_init__(self):
        # The Python API takes what the command line takes: a path, "a.jsonl:0.7,b.parquet:0.3", a list of them
        # or of DataSource (None for no eval data).
        for name in ("data", "eval_data"):
            value = getattr(self, name)
            if not (isinstance(value, tuple) and all(isinstance(s, DataSource) for s in value)):
                setattr(self, name, convert_field(name, value, tuple[DataSource, ...]) if value is not None else ())
        for name in ("micro_batch_size", "grad_accum", "keep_last", "log_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: expected an integer >= 1")
        for name in ("save_steps", "eval_steps", "max_nonfinite_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)}: expected an integer >= 0")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"max_steps={self.max_steps}: expected a positive number of steps, or -1 to use epochs")
        if self.max_steps == -1 and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ConfigError(f"epochs={self.epochs}: expected > 0 when max_steps is -1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr={self.lr}: expected a positive learning rate")
        if self.lr > MAX_LR:  # Adam moves every adapter weight by ~lr per step: this drives the model to uniform output
            raise ConfigError(f"lr={self.lr}: expected at most {MAX_LR} (adapter rates are typically 1e-4 to 1e-2)")
        if not 0 <= self.seed < 2**32:  # numpy's and datasets' seeds are 32-bit
            raise ConfigError(f"seed={self.seed}: expected an integer 0 <= seed < 2**32")
        if not self.output_dir.strip():
            raise ConfigError("output_dir='': expected a directory for the run (an empty one would write into the current "
                              "directory)")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio={self.warmup_ratio}: expected 0 <= warmup_ratio < 1")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio={self.min_lr_ratio}: expected 0 <= min_lr_ratio <= 1")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction={self.eval_fraction}: expected 0 <= eval_fraction < 1")
        if not (self.max_grad_norm >= 0 and math.isfinite(self.max_grad_norm)):  # NaN fails every comparison
            raise ConfigError(f"max_grad_norm={self.max_grad_norm}: expected a finite number >= 0 (0 turns clipping off)")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ConfigError(f"weight_decay={self.weight_decay}: expected a finite number >= 0")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS and "/" not in self.attn_implementation:  # "/": a hub kernel
            raise ConfigError(f"attn_implementation={self.attn_implementation!r}: expected one of "
                              f"{', '.join(a for a in ATTN_IMPLEMENTATIONS if a)} (or unset for transformers' default)")
        check_single_rank_zero3(self.single_rank_zero3)
        for name in ("liger", "compile_layers"):
            if getattr(self, name) not in AUTO_TRUE_FALSE:
                raise ConfigError(f"{name}={getattr(self, name)!r}: expected one of {', '.join(AUTO_TRUE_FALSE)}")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"dtype={self.dtype!r}: expected one of auto, bf16, fp32")
        if self.activation_memory_gb is not None:
            self.activation_memory_gb = _check_activation_memory(self.activation_memory_gb)
        if self.max_seq_len < 8:
            raise ConfigError(f"max_seq_len={self.max_seq_len}: expected at least 8 tokens")
        if not self.data:
            raise ConfigError("data is empty; expected at least one data source")
        weighted = [s.weight is not None for s in self.data]
        if len(self.data) > 1 and any(weighted) and not all(weighted):
            raise ConfigError(f"data {', '.join(map(str, self.data))}: some sources have a weight and some not; expected a "
                              "weight for every source (a weighted mix) or for none (concatenated)")
        if any(s.weight is not None for s in self.eval_data):
            raise ConfigError(f"eval_data {', '.join(map(str, self.eval_data))}: eval sources are concatenated whole; "
                              "expected no weights")
        if self.mix_strategy not in MIX_STRATEGIES:
            raise ConfigError(f"mix_strategy={self.mix_strategy!r}: expected one of {', '.join(MIX_STRATEGIES)}")
        if self.resume and self.overwrite:
            raise ConfigError(f"resume={self.resume!r} and overwrite=true contradict each other; expected one of them")
        self.report_to = _check_report_to(self.report_to)
        self.adapter_config()  # validates ranks, alphas, dropout, targets, groups

    def adapter_config(self) -> MSPLoRAConfig:
        return MSPLoRAConfig(ranks=self.ranks, alphas=self.alphas, num_mid_groups=self.num_mid_groups,
                             target_modules=self.target_modules, dropout=self.dropout, use_rslora=self.use_rslora)

    def resolved_dtype(self, on_gpu: bool) -> str:
        return ("bf16" if on_gpu else "fp32") if self.dtype == "auto" else self.dtype

    def ds_values(self) -> dict:
        """The training values dist.ds_config.resolve_ds_config fills DeepSpeed's "auto" entries from."""
        return {"micro_batch_size": self.micro_batch_size, "grad_accum": self.grad_accum, "lr": self.lr,
                "weight_decay": self.weight_decay, "max_grad_norm": self.max_grad_norm, "single_rank_zero3": self.single_rank_zero3}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _check_activation_memory(value) -> str:
    """--activation_memory_gb as text: auto, or a positive finite number of GB."""
    text = str(value).strip()
    if text == "auto":
        return text
    try:
        amount = float(text)
    except ValueError:
        amount = math.nan
    if isinstance(value, bool) or not (0 < amount <= 1e6):  # 1e6 GB: beyond any device; NaN and inf fail too
        raise ConfigError(f"activation_memory_gb={value!r}: expected a positive number of GB up to 1e6, or auto")
    return text


def _check_report_to(value) -> tuple[str, ...]:
    """The --report_to backends, each known and installed; "none" alone means no backend."""
    import importlib.util

    names = tuple(value) if isinstance(value, tuple | list) else (value,)
    if names in (("none",), ()):
        return ()
    for name in names:
        if name not in REPORT_BACKENDS:
            raise ConfigError(f"report_to={','.join(names)!r}: {name!r} is not a backend; expected a comma-separated list of "
                              f"{', '.join(REPORT_BACKENDS)}, or none")
        if importlib.util.find_spec(REPORT_BACKENDS[name]) is None:
            raise ConfigError(f"report_to includes {name}, which is not installed; expected `pip install {REPORT_BACKENDS[name]}` "
                              "or another --report_to")
    return names


# --- command line and YAML ----------------------------------------------------------------------------

def convert_field(name: str, value, hint):
    """Turn a YAML or command-line value into the field's type, with an error naming the field."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None:
        return None
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        inner = [a for a in args if a is not type(None)]
        if isinstance(value, str) and value.lower() in ("none", "null", ""):
            return None
        return convert_field(name, value, inner[0])
    if origin is tuple:
        if isinstance(value, str) and value.strip().lower() in ("", "none", "null"):
            return ()
        items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, list | tuple) else [value]
        items = [i.strip() if isinstance(i, str) else i for i in items]
        items = [i for i in items if i != ""]
        elem = args[0]
        if args[-1] is not Ellipsis and len(items) == 1:
            items = items * len(args)  # one value for every level
        return tuple(convert_field(name, i, elem) for i in items)
    if dataclasses.is_dataclass(hint):
        return hint.parse(name, value)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if hint is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r}: expected {getattr(hint, '__name__', hint)}") from None


def save_config_yaml(cfg: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
