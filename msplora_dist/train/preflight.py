"""Everything a user can get wrong, checked before any process spends time loading the model: the configs,
the model directory, the data (every row tokenized), the output directory and the resume checkpoint.
Raises UserError (one line: the value and what was expected) and writes nothing but a removed probe file.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from msplora_dist.adapters.config import MSPLoRAConfig
from msplora_dist.dist.ds_config import read_ds_config, resolve_ds_config, zero_stage
from msplora_dist.errors import ConfigError
from msplora_dist.train import gguf
from msplora_dist.train.backbone import DTYPES, check_model_dir, gguf_4bit_refused, load_tokenizer, projection_features, quantization_config
from msplora_dist.train.config import ATTN_IMPLEMENTATIONS, TrainConfig
from msplora_dist.train.data import GlobalBatchSampler, detect_format, load_rows, pack_examples, tokenize_dataset
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

    @property
    def zero_stage(self) -> int:
        return zero_stage(self.ds_config)


def prepare_data(cfg: TrainConfig, tokenizer):
    """Tokenized train and eval splits. Runs before the model is loaded, so bad data fails fast."""
    rows = load_rows(cfg.data)
    fmt = detect_format(rows, cfg.data)
    if cfg.eval_data:
        eval_rows = load_rows(cfg.eval_data)
        eval_fmt = detect_format(eval_rows, cfg.eval_data)
    elif cfg.eval_fraction > 0 and len(rows) >= 2:
        split = rows.train_test_split(test_size=cfg.eval_fraction, seed=cfg.seed)
        rows, eval_rows, eval_fmt = split["train"], split["test"], fmt
    else:
        eval_rows, eval_fmt = None, None
    train = tokenize_dataset(rows, fmt, tokenizer, cfg.max_seq_len, cfg.train_on_prompt, cfg.data)
    log(f"data: {train.num_rows} {fmt} rows from {cfg.data}; {train.num_truncated} truncated to {cfg.max_seq_len} tokens, "
        f"{train.num_dropped} dropped (no response token left)")
    evals = None
    if eval_rows is not None:
        evals = tokenize_dataset(eval_rows, eval_fmt, tokenizer, cfg.max_seq_len, cfg.train_on_prompt, cfg.eval_data or cfg.data)
        log(f"eval: {len(evals.dataset)} rows ({evals.num_truncated} truncated, {evals.num_dropped} dropped: no response token left)")
    train_ds = pack_examples(train.dataset, cfg.max_seq_len, cfg.seed) if cfg.packing else train.dataset
    return train_ds, (evals.dataset if evals else None)


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


def preflight(cfg: TrainConfig, world: int, on_gpu: bool) -> Plan:
    """Check everything a user can get wrong and prepare the data. Raises UserError; writes nothing."""
    dtype = cfg.resolved_dtype(on_gpu)
    raw_ds = read_ds_config(cfg.ds_config)
    hf_config = check_model_dir(cfg.model)
    adapter_cfg = cfg.adapter_config().with_groups(hf_config["num_hidden_layers"])
    features = projection_features(hf_config)
    unknown = [t for t in adapter_cfg.target_modules if t not in features]
    if unknown:
        raise ConfigError(f"target_modules {unknown} are not projections of a {hf_config['model_type']} model; "
                          f"expected some of {list(features)}")
    if cfg.load_in_4bit:
        if (gguf_file := gguf.find_gguf(cfg.model)) is not None:
            raise gguf_4bit_refused(gguf_file)
        quantization_config(DTYPES[dtype])  # bitsandbytes importable and usable
    needed = ATTN_IMPLEMENTATIONS.get(cfg.attn_implementation)
    if needed and importlib.util.find_spec(needed) is None:
        raise ConfigError(f"attn_implementation={cfg.attn_implementation!r} needs the {needed} package, which is not installed; "
                          "expected sdpa or eager, or install it")
    largest = max(max(adapter_cfg.ranks) * f for t in adapter_cfg.target_modules for f in features[t])
    global_batch = cfg.micro_batch_size * cfg.grad_accum * world

    def ds_config(load_universal: bool = False) -> dict:
        return resolve_ds_config(raw_ds, **cfg.ds_values(), world_size=world, dtype=dtype, largest_adapter_numel=largest,
                                 load_universal=load_universal)

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

    tokenizer = load_tokenizer(cfg.model)
    train_ds, eval_ds = prepare_data(cfg, tokenizer)
    sampler = GlobalBatchSampler(len(train_ds), global_batch, cfg.seed)
    if resume_dir is not None:
        check_resume_data(resume_dir, cfg.to_dict(), sampler.num_examples)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, int(cfg.epochs * sampler.steps_per_epoch))
    return Plan(dtype, resolved, adapter_cfg, tokenizer, train_ds, eval_ds, sampler, total_steps, resume_dir, world)
