"""Everything a user can get wrong, checked before any process spends time loading the model: the configs,
the model directory, the data (every row tokenized), the output directory and the resume checkpoint.
Raises UserError (one line: the value and what was expected). It writes no run output: only the output directory
itself (checked writable with a removed probe file) and the tokenized-data cache (train/cache.py).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import datasets
from jinja2 import TemplateError

from msplora_dist.adapters.config import MSPLoRAConfig
from msplora_dist.dist.ds_config import demoted_zero3, read_ds_config, resolve_ds_config, zero_stage
from msplora_dist.errors import ConfigError
from msplora_dist.train import gguf
from msplora_dist.train.backbone import (
    DTYPES,
    check_model_dir,
    gguf_4bit_refused,
    load_tokenizer,
    projection_features,
    quantization_config,
)
from msplora_dist.train.cache import default_cache_dir, tokenize_cached
from msplora_dist.train.config import ATTN_IMPLEMENTATIONS, TrainConfig
from msplora_dist.train.data import GlobalBatchSampler, keep_trainable, pack_examples
from msplora_dist.train.hub import resolve_model
from msplora_dist.train.kernels import resolve_compile, resolve_liger
from msplora_dist.train.prompts import ensure_chat_template, read_chat_template
from msplora_dist.train.sources import hold_out, load_sources, mix, mix_summary
from msplora_dist.train.state import check_resume_compatible, check_resume_data, checkpoint_root, find_resume_dir
from msplora_dist.utils.log import log


@dataclass
class Plan:
    """What the preflight checks established, before any process spends time loading the model."""

    dtype: str
    ds_config: dict
    adapter_config: MSPLoRAConfig
    tokenizer: object
    train_ds: object
    eval_ds: object
    sampler: GlobalBatchSampler
    total_steps: int
    resume_dir: Path | None
    world_size: int
    model_dir: Path
    """cfg.model as a local path: itself, or its snapshot in the Hugging Face cache for a Hub name."""
    model_type: str = "llama"
    liger: bool = False
    compile_layers: bool = False
    demoted_zero3: bool = False
    """The --ds_config is ZeRO-3 and this one-rank run uses stage 2 (dist/ds_config.py, --single_rank_zero3)."""

    @property
    def zero_stage(self) -> int:
        return zero_stage(self.ds_config)


def choose_chat_template(tokenizer, override: str | None) -> None:
    """--chat_template when given, else the tokenizer's own, else DEFAULT_CHAT_TEMPLATE (a base model has none).
    Set before the cache key is made, since the template decides the tokens of chat rows."""
    if override:
        tokenizer.chat_template = read_chat_template(override)
        try:  # a syntax error is the file's fault, not a row's: say so before any row is rendered
            tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], tokenize=False)
        except TemplateError as err:
            raise ConfigError(f"chat_template={override!r} is not a usable Jinja chat template ({err})") from None
    ensure_chat_template(tokenizer)


def data_cache_dir(cfg: TrainConfig) -> Path | None:
    if not cfg.data_cache:
        return None
    return Path(cfg.data_cache_dir).expanduser() if cfg.data_cache_dir else default_cache_dir()


def prepare_data(cfg: TrainConfig, tokenizer):
    """Tokenized train and eval splits. Runs before the model is loaded, so bad data fails fast: every source is
    loaded and its format found first, then every row of every source is tokenized (or its cache entry mapped)."""
    choose_chat_template(tokenizer, cfg.chat_template)
    cache_dir = data_cache_dir(cfg)
    train_sources, eval_sources = load_sources(cfg.data), load_sources(cfg.eval_data)

    def tokenized(loaded, index: int):
        src = loaded.source
        tok = tokenize_cached(loaded.rows, loaded.fmt, tokenizer, cfg.max_seq_len, cfg.train_on_prompt, label=src.path,
                              split=src.split, subset=src.subset, files=loaded.files, cache_dir=cache_dir)
        # A column added to the unmapped table stays in memory; after a filter it would be written beside the cache.
        return tok.add_column("source", [index] * len(tok))

    train_parts, eval_parts = [], []
    for i, loaded in enumerate(train_sources):
        train_tok, eval_tok = hold_out(tokenized(loaded, i), 0 if cfg.eval_data else cfg.eval_fraction, cfg.seed)
        train = keep_trainable(train_tok, loaded.source.path, cfg.max_seq_len)
        log(f"data: {train.num_rows} {loaded.fmt} rows from {loaded.source.path}; {train.num_truncated} truncated to "
            f"{cfg.max_seq_len} tokens, {train.num_dropped} dropped (no response token left), {train.num_empty} empty "
            "dropped (every field an empty string)")
        train_parts.append(train.dataset)
        if eval_tok is not None:
            eval_parts.append(keep_trainable(eval_tok, loaded.source.path, cfg.max_seq_len))
    for i, loaded in enumerate(eval_sources):
        eval_parts.append(keep_trainable(tokenized(loaded, i), loaded.source.path, cfg.max_seq_len))
    train_ds = mix(train_parts, [s.weight for s in cfg.data], cfg.seed, cfg.mix_strategy)
    if len(train_parts) > 1:
        log(f"data mix: {len(train_ds)} training rows, {mix_summary(train_ds, list(cfg.data))}")
    eval_ds = None
    if eval_parts:
        eval_ds = datasets.concatenate_datasets([e.dataset for e in eval_parts])
        log(f"eval: {len(eval_ds)} rows ({sum(e.num_truncated for e in eval_parts)} truncated, "
            f"{sum(e.num_dropped for e in eval_parts)} dropped: no response token left, "
            f"{sum(e.num_empty for e in eval_parts)} empty dropped)")
    if cfg.packing:
        train_ds = pack_examples(train_ds, cfg.max_seq_len, cfg.seed)
    return train_ds, eval_ds


def check_output_dir(cfg: TrainConfig) -> None:
    """The output directory is writable, and holds no earlier run unless --resume or --overwrite says what to do."""
    output_dir = Path(cfg.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}-{os.environ.get('RANK', '0')}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"--output_dir {str(output_dir)!r} is not writable ({err.strerror}); expected a writable directory") from None
    earlier = [p.name for p in (checkpoint_root(output_dir), output_dir / "adapter") if p.exists()]
    if earlier and not cfg.resume and not cfg.overwrite:
        raise ConfigError(f"--output_dir {str(output_dir)!r} already holds {earlier} of an earlier run; "
                          "pass --resume latest to continue it, --overwrite true to replace it, or another --output_dir")


DEEPSPEED_FLOOR = "0.19.8"
"""The oldest DeepSpeed whose ZeRO optimizers skip a non-finite step in fp32 at every stage (earlier ones apply a NaN
gradient under ZeRO-1/2 and check only fp16 under ZeRO-3); pyproject.toml requires it too."""


def check_dependencies() -> None:
    from importlib.metadata import version

    from packaging.version import Version

    found = version("deepspeed")
    if Version(found) < Version(DEEPSPEED_FLOOR):
        raise ConfigError(f"deepspeed {found} is installed; expected >= {DEEPSPEED_FLOOR} (its ZeRO optimizers skip non-finite "
                          "steps, which the trainer relies on): pip install -U deepspeed")


def preflight(cfg: TrainConfig, world: int, on_gpu: bool) -> Plan:
    """Check everything a user can get wrong and prepare the data. Raises UserError; writes no run output."""
    check_dependencies()
    dtype = cfg.resolved_dtype(on_gpu)
    raw_ds = read_ds_config(cfg.ds_config)
    model_dir = resolve_model(cfg.model)
    hf_config = check_model_dir(model_dir)
    adapter_cfg = cfg.adapter_config().with_groups(hf_config["num_hidden_layers"])
    features = projection_features(hf_config)
    unknown = [t for t in adapter_cfg.target_modules if t not in features]
    if unknown:
        raise ConfigError(f"target_modules {unknown} are not projections of a {hf_config['model_type']} model; "
                          f"expected some of {list(features)}")
    if cfg.load_in_4bit:
        if (gguf_file := gguf.find_gguf(model_dir)) is not None:
            raise gguf_4bit_refused(gguf_file)
        quantization_config(DTYPES[dtype])  # bitsandbytes importable and usable
    needed = ATTN_IMPLEMENTATIONS.get(cfg.attn_implementation)
    if needed and importlib.util.find_spec(needed) is None:
        raise ConfigError(f"attn_implementation={cfg.attn_implementation!r} needs the {needed} package, which is not installed; "
                          "expected sdpa or eager, or install it")
    liger = resolve_liger(cfg.liger, hf_config.get("model_type", ""), on_gpu)
    if cfg.activation_memory_gb == "auto" and not on_gpu:
        raise ConfigError("activation_memory_gb='auto' reads a GPU's free memory and this run has no GPU; expected a number "
                          "of GB (the activations live in host memory on a CPU)")
    global_batch = cfg.micro_batch_size * cfg.grad_accum * world

    def ds_config(load_universal: bool = False) -> dict:
        return resolve_ds_config(raw_ds, **cfg.ds_values(), world_size=world, dtype=dtype, load_universal=load_universal)

    resolved = ds_config()
    resume_dir = None
    if cfg.resume:
        resume_dir = find_resume_dir(cfg.output_dir, cfg.resume, log=log)
        resume_world = check_resume_compatible(resume_dir, adapter_cfg, hf_config,
                                               {"global_batch": global_batch, "zero_stage": zero_stage(resolved), "dtype": dtype})
        if resume_world != world:
            log(f"resume: {resume_dir} was written by {resume_world} rank(s), this run has {world}; its optimizer state "
                "is re-partitioned through DeepSpeed's universal checkpoint format")
            resolved = ds_config(load_universal=True)
    check_output_dir(cfg)

    tokenizer = load_tokenizer(model_dir)
    train_ds, eval_ds = prepare_data(cfg, tokenizer)
    sampler = GlobalBatchSampler(len(train_ds), global_batch, cfg.seed)
    if resume_dir is not None:
        check_resume_data(resume_dir, cfg.to_dict(), sampler.num_examples)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, int(cfg.epochs * sampler.steps_per_epoch))
    return Plan(dtype, resolved, adapter_cfg, tokenizer, train_ds, eval_ds, sampler, total_steps, resume_dir, world, model_dir,
                hf_config.get("model_type", "llama"), liger,
                resolve_compile(cfg.compile_layers, on_gpu, zero_stage(resolved), cfg.zero3_leaf_layers),
                demoted_zero3(raw_ds, resolved))
