"""Fine-tune a LLaMA-family model with MSPLoRA on DeepSpeed.

The embedded default (a tiny model and data shipped in msplora_dist/assets), on a CPU in about a minute:

    deepspeed launch/train.py --ds_config ds_configs/zero3.json

A real run (one node, 8 GPUs, 4-bit backbone, the paper's adapter setting):

    deepspeed --num_gpus 8 launch/train.py --ds_config ds_configs/zero3.json \\
        --model /models/Llama-2-7b-hf --data alpaca.jsonl --output_dir runs/llama2-msplora \\
        --load_in_4bit true --gradient_checkpointing true --ranks 64,32,16 --alphas 16 \\
        --num_mid_groups 3 --target_modules q_proj,v_proj --micro_batch_size 4 --grad_accum 4 --lr 2e-4

Several nodes: DeepSpeed's own launcher with a hostfile (see README):

    deepspeed --hostfile hostfile launch/train.py --ds_config ds_configs/zero3.json ...

Resume the newest complete checkpoint: add `--resume latest`. Any flag can also come from a YAML
file (`--config run.yaml`); flags override it. `python launch/train.py ...` runs one process.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from msplora_dist import MSPLoRAConfig, UserError, apply_msplora, param_report, save_adapter
from msplora_dist.backbone import (
    DTYPES,
    check_model_dir,
    load_backbone,
    load_tokenizer,
    projection_features,
    quantization_config,
    set_eval_mode,
)
from msplora_dist.checkpoint import write_file_atomically
from msplora_dist.data import (
    IGNORE_INDEX,
    GlobalBatchSampler,
    collate,
    detect_format,
    eval_batches,
    load_rows,
    pack_examples,
    tokenize_dataset,
)
from msplora_dist.distributed import init_distributed, shutdown_distributed
from msplora_dist.ds_config import read_ds_config, resolve_ds_config, zero_stage
from msplora_dist.errors import ConfigError
from msplora_dist.model import adapter_params
from msplora_dist.train_config import ATTN_IMPLEMENTATIONS, TrainConfig, parse_config, save_config_yaml
from msplora_dist.train_state import (
    check_resume_compatible,
    check_resume_data,
    checkpoint_root,
    find_resume_dir,
    load_checkpoint,
    save_checkpoint,
)
from msplora_dist.zero import full_numel, local_numel, register_adapters_with_zero3


def log(msg: str) -> None:
    """Print on rank 0 only (RANK is set by the launcher before torch.distributed starts), above the
    progress bar rather than through it."""
    if int(os.environ.get("RANK", "0")) == 0:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stdout)
        sys.stdout.flush()


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


def lr_lambda(cfg: TrainConfig, total_steps: int):
    warmup = int(cfg.warmup_ratio * total_steps)

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return fn


def loss_sum(engine, batch: dict, device) -> torch.Tensor:
    """Sum of the shifted token cross-entropies of one micro-batch, in fp32."""
    batch = {k: v.to(device) for k, v in batch.items()}
    labels = batch.pop("labels")
    logits = engine(**batch, use_cache=False).logits  # with a cache, transformers ignores packed position_ids
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


@torch.no_grad()
def evaluate(engine, eval_ds, cfg: TrainConfig, pad_id: int, device, rank: int, world: int) -> tuple[float, float]:
    """Token-weighted eval loss and perplexity over the whole eval set, identical on every rank."""
    set_eval_mode(engine.module)
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for indices in eval_batches(len(eval_ds), cfg.micro_batch_size, rank, world):
        # A rank whose share ran out still runs a forward (ZeRO-3 gathers are collective), on a
        # stand-in example that it does not count.
        examples = [eval_ds[i] for i in indices] if indices else [eval_ds[0]]
        ce = loss_sum(engine, collate(examples, pad_id), device)
        if indices:
            totals[0] += ce.double()
            totals[1] += sum(e["num_loss_tokens"] for e in examples)
    dist.all_reduce(totals)
    engine.train()
    loss = (totals[0] / totals[1]).item()
    return loss, math.exp(min(loss, 50.0))


def peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def adapter_digest(model) -> str:
    """sha256 of this rank's adapter tensors, byte for byte, to prove the replicas are identical."""
    digest = hashlib.sha256()
    for name, param in sorted(adapter_params(model).items()):
        digest.update(name.encode())
        digest.update(param.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def backbone_partition(model, world: int, device) -> dict:
    """How much of the frozen backbone each rank holds. Under ZeRO-3 each rank keeps 1/world of every
    partitioned tensor; tensors at or below stage3_param_persistence_threshold (norms, and on tiny
    models small 4-bit weights) are persistent, i.e. whole on every rank."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    persistent = sum(full_numel(p) for p in frozen if getattr(p, "ds_persist", False))
    local = torch.tensor([sum(local_numel(p) for p in frozen)], device=device)
    per_rank = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(per_rank, local)
    return {"full_numel": sum(full_numel(p) for p in frozen), "persistent_numel": persistent,
            "local_numel_per_rank": [int(t.item()) for t in per_rank]}


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
    startup_s: float = 0.0


def preflight(cfg: TrainConfig, world: int, on_gpu: bool) -> Plan:
    """Check everything a user can get wrong (configs, model directory, data, output directory,
    resume checkpoint) and prepare the data. Raises UserError; writes nothing."""
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
        quantization_config(DTYPES[dtype])  # bitsandbytes importable and usable
    needed = ATTN_IMPLEMENTATIONS.get(cfg.attn_implementation)
    if needed and importlib.util.find_spec(needed) is None:
        raise ConfigError(f"attn_implementation={cfg.attn_implementation!r} needs the {needed} package, which is not installed; "
                          "expected sdpa or eager, or install it")
    largest = max(max(adapter_cfg.ranks) * f for t in adapter_cfg.target_modules for f in features[t])
    global_batch = cfg.micro_batch_size * cfg.grad_accum * world
    ds_config = resolve_ds_config(raw_ds, cfg, world_size=world, dtype=dtype, largest_adapter_numel=largest)
    resume_dir = None
    if cfg.resume:
        resume_dir = find_resume_dir(cfg.output_dir, cfg.resume, log=log)
        resume_world = check_resume_compatible(resume_dir, adapter_cfg, hf_config,
                                               {"global_batch": global_batch, "zero_stage": zero_stage(ds_config), "dtype": dtype})
        if resume_world != world:
            log(f"resume: {resume_dir} was written by {resume_world} rank(s), this run has {world}; its optimizer state "
                "is re-partitioned through DeepSpeed's universal checkpoint format")
            ds_config = resolve_ds_config(raw_ds, cfg, world_size=world, dtype=dtype, largest_adapter_numel=largest,
                                          load_universal=True)

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

    tokenizer = load_tokenizer(cfg.model)
    train_ds, eval_ds = prepare_data(cfg, tokenizer)
    sampler = GlobalBatchSampler(len(train_ds), global_batch, cfg.seed)
    if resume_dir is not None:
        check_resume_data(resume_dir, cfg.to_dict(), sampler.num_examples)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, int(cfg.epochs * sampler.steps_per_epoch))
    return Plan(dtype, ds_config, adapter_cfg, tokenizer, train_ds, eval_ds, sampler, total_steps, resume_dir)


def build_engine(cfg: TrainConfig, plan: Plan):
    """Frozen backbone + MSPLoRA hierarchy, wrapped by DeepSpeed with warmup + cosine."""
    import deepspeed

    model = load_backbone(cfg.model, dtype=plan.dtype, load_in_4bit=cfg.load_in_4bit, ds_config=plan.ds_config,
                          gradient_checkpointing=cfg.gradient_checkpointing, attn_implementation=cfg.attn_implementation)
    torch.manual_seed(cfg.seed)  # the same adapter init on every rank
    model = apply_msplora(model, plan.adapter_config)
    if zero_stage(plan.ds_config) == 3:
        register_adapters_with_zero3(model)
    log(str(param_report(model)))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=list(adapter_params(model).values()), config=plan.ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, plan.total_steps)),
    )
    return engine, scheduler


def injected_nan_steps() -> set[int]:
    """Fault injection for the tests of the failure path: MSPLORA_INJECT_NAN_AT_STEPS="3,5" makes the
    loss of those (1-based) steps NaN, as a diverging batch would."""
    value = os.environ.get("MSPLORA_INJECT_NAN_AT_STEPS", "")
    return {int(v) for v in value.split(",") if v.strip()}


def train(cfg: TrainConfig) -> dict:
    import datasets
    from tqdm import tqdm

    datasets.disable_progress_bars()  # one summary line per split instead (prepare_data)
    on_gpu = torch.cuda.is_available()
    plan = preflight(cfg, int(os.environ.get("WORLD_SIZE", "1")), on_gpu)
    output_dir = Path(cfg.output_dir)

    rank, world = init_distributed(on_gpu)
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    if cfg.overwrite and rank == 0:  # everything an earlier run wrote, so nothing of it is mistaken for this run's
        for earlier in (checkpoint_root(output_dir), output_dir / "adapter", output_dir / "analysis", output_dir / "tb"):
            shutil.rmtree(earlier, ignore_errors=True)
        (output_dir / "summary.json").unlink(missing_ok=True)
    engine, scheduler = build_engine(cfg, plan)
    if rank == 0:
        save_config_yaml(cfg, output_dir / "train_config.yaml")
        write_file_atomically(output_dir / "ds_config.json", json.dumps(plan.ds_config, indent=2))
    backbone = f"{plan.dtype}, 4-bit backbone" if cfg.load_in_4bit else plan.dtype
    if world == 1 and zero_stage(plan.ds_config) == 3:
        log("note: ZeRO-3 on one rank partitions nothing and gathers every layer; use ds_configs/zero2.json when the "
            "model fits (1.5x faster on one H200 at the 7B shape, docs/benchmarks.md)")
    log(f"run: {plan.total_steps} steps of a global batch of {plan.sampler.global_batch} (micro {cfg.micro_batch_size} x accum "
        f"{cfg.grad_accum} x {world} ranks), ZeRO-{zero_stage(plan.ds_config)}, {backbone}, lr {cfg.lr:g}; "
        f"full config in {output_dir / 'train_config.yaml'}")
    step, history = 0, []
    if plan.resume_dir is not None:
        state = load_checkpoint(engine, plan.resume_dir, checkpoint_root(output_dir))
        step, history = state["step"], state["history"]
        log(f"resumed from {plan.resume_dir} at step {step}")
        if state.get("total_steps") not in (None, plan.total_steps):
            log(f"note: the checkpoint's run had {state['total_steps']} steps, this one has {plan.total_steps}: the warmup + cosine "
                "schedule is recomputed for the new length, so the learning rate jumps at the resume")
        if step >= plan.total_steps:
            log(f"note: the checkpoint is at step {step} of {plan.total_steps}: nothing is left to train; the final adapter "
                "is written again. Raise --max_steps or --epochs to train further")

    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(output_dir / "tb"))
    eval_ds, pad_id, total_steps = plan.eval_ds, plan.tokenizer.pad_token_id, plan.total_steps
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, dynamic_ncols=True, desc="train",
               mininterval=0.5 if sys.stderr.isatty() else 10.0)
    if eval_ds is not None and step == 0 and cfg.eval_steps:
        # Where the base model starts, so the log shows how far training moved it.
        loss0, ppl0 = evaluate(engine, eval_ds, cfg, pad_id, device, rank, world)
        log(f"step 0/{total_steps}  eval_loss {loss0:.4f}  eval_ppl {ppl0:.2f}")
        history.append({"step": 0, "eval_loss": loss0, "eval_ppl": ppl0})
    engine.train()
    plan.startup_s = time.time() - psutil.Process().create_time()  # imports, loading, DeepSpeed set-up
    try:
        try:
            run_steps(cfg, engine, scheduler, plan, step, history, rank, world, device, writer, bar)
        finally:
            bar.close()
        return finish(cfg, engine, history, plan, rank, world, device, writer)
    finally:
        if writer is not None:
            writer.close()  # also on a stopped run: its events up to the stop are kept


def run_steps(cfg: TrainConfig, engine, scheduler, plan: Plan, step: int, history: list[dict], rank: int, world: int,
              device, writer, bar) -> None:
    """The training loop proper, from `step` to plan.total_steps; appends to history."""
    output_dir = Path(cfg.output_dir)
    train_ds, eval_ds, sampler = plan.train_ds, plan.eval_ds, plan.sampler
    pad_id, total_steps, nan_steps = plan.tokenizer.pad_token_id, plan.total_steps, injected_nan_steps()
    nonfinite_in_a_row = 0
    while step < total_steps:
        t0 = time.perf_counter()
        lr = scheduler.get_last_lr()[0]  # the rate this step's update uses (engine.step advances the schedule)
        indices = sampler.global_batch_indices(step)
        # Every rank computes the global batch's loss-token count itself: the loss is the token mean
        # over the whole global batch, whatever the split into ranks and micro-batches.
        n_global = sum(train_ds[i]["num_loss_tokens"] for i in indices)
        stats = torch.zeros(2, dtype=torch.float64, device=device)
        for accum_step in range(cfg.grad_accum):
            examples = [train_ds[i] for i in sampler.micro_batch_indices(step, accum_step, rank, world, cfg.micro_batch_size)]
            ce = loss_sum(engine, collate(examples, pad_id), device)
            if step + 1 in nan_steps:
                ce = ce * float("nan")
            # DeepSpeed divides by grad_accum and averages over ranks; undo both so the gradient is
            # d(sum of token losses / n_global).
            engine.backward(ce * (world * cfg.grad_accum / n_global))
            engine.step()  # the optimizer steps at the accumulation boundary only
            stats += torch.tensor([ce.item(), sum(len(e["input_ids"]) for e in examples)], dtype=torch.float64, device=device)
        dist.all_reduce(stats)
        step += 1
        loss = stats[0].item() / n_global
        # DeepSpeed's ZeRO optimizers skip the update when the gradient norm is not finite.
        applied = engine.was_step_applied()
        if not applied or not math.isfinite(loss):
            nonfinite_in_a_row += 1
        else:
            nonfinite_in_a_row = 0
        if applied and not math.isfinite(loss):
            raise TrainingStopped(f"step {step}: the loss is {loss} but the optimizer applied the update; the adapters may "
                                  "be corrupt (this should not happen with ZeRO stage >= 1), stopping")
        grad_norm = engine.get_global_grad_norm()
        record = {"step": step, "loss": loss, "lr": lr,
                  "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                  "tokens": int(stats[1].item()), "time_s": time.perf_counter() - t0}
        record["tokens_per_s"] = record["tokens"] / record["time_s"]
        if not applied:
            record["skipped"] = True
            log(f"step {step}: non-finite loss or gradient (loss {loss}); update skipped "
                f"({nonfinite_in_a_row} in a row, the run stops at {cfg.max_nonfinite_steps})")
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        stop = bool(cfg.max_nonfinite_steps) and nonfinite_in_a_row >= cfg.max_nonfinite_steps
        if eval_ds is not None and not stop and ((cfg.eval_steps and step % cfg.eval_steps == 0) or step == total_steps):
            record["eval_loss"], record["eval_ppl"] = evaluate(engine, eval_ds, cfg, pad_id, device, rank, world)
            log(f"step {step}/{total_steps}  loss {loss:.4f}  eval_loss {record['eval_loss']:.4f}  eval_ppl {record['eval_ppl']:.2f}")
        record["peak_mem_gb"] = peak_memory_gb(device)
        history.append(record)
        if writer is not None and (step % cfg.log_steps == 0 or "eval_loss" in record):
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_gb", "eval_loss", "eval_ppl"):
                if key in record and math.isfinite(record[key]):
                    writer.add_scalar(f"eval/{key[5:]}" if key.startswith("eval") else f"train/{key}", record[key], step)
        if stop or (cfg.save_steps and step % cfg.save_steps == 0) or step == total_steps:
            # After skipped steps the adapters are those of the last good step: this checkpoint holds them.
            state = {"step": step, "world_size": world, "zero_stage": zero_stage(plan.ds_config),
                     "dtype": plan.dtype, "num_train_examples": sampler.num_examples, "total_steps": total_steps, "history": history,
                     "config": cfg.to_dict()}
            path = save_checkpoint(engine, output_dir, step, state, cfg.keep_last)
            log(f"checkpoint: {path}")
        if stop:
            raise TrainingStopped(f"{nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (steps "
                                  f"{step - nonfinite_in_a_row + 1}-{step}); the last good state is in {path}. Lower --lr, "
                                  "check the data, or resume with --resume latest")


def finish(cfg: TrainConfig, engine, history: list[dict], plan: Plan, rank: int, world: int, device, writer) -> dict:
    """Check the replicas agree, write the final adapter, the analysis report and summary.json."""
    output_dir = Path(cfg.output_dir)
    # The shared adapters must be bit-identical on every rank: check the fingerprints agree.
    digests = [None] * world
    dist.all_gather_object(digests, adapter_digest(engine.module))
    replicas_identical = len(set(digests)) == 1
    if not replicas_identical:
        raise RuntimeError("the adapter replicas differ across ranks after training; this is a bug, please report it")
    save_adapter(engine.module, output_dir / "adapter")
    if cfg.analyze:
        from msplora_dist.analysis import analyze_model, tensorboard_scalars, write_report

        report = analyze_model(engine.module)  # collective under ZeRO-3: every rank calls it
        if rank == 0:
            write_report(report, output_dir / "analysis")
            for tag, value in tensorboard_scalars(report).items():
                writer.add_scalar(tag, value, plan.total_steps)
            log(f"analysis: {output_dir / 'analysis' / 'index.html'}")
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    speeds = sorted(h["tokens_per_s"] for h in history if "tokens_per_s" in h and not h.get("skipped"))
    peak = torch.tensor([peak_memory_gb(device)], dtype=torch.float64, device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    losses = [h["loss"] for h in history if "loss" in h]
    summary = {"steps": history[-1]["step"] if history else 0, "world_size": world, "global_batch": plan.sampler.global_batch,
               "final_loss": losses[-1] if losses else None,
               "first_eval_loss": evals[0] if evals else None, "final_eval_loss": evals[-1] if evals else None,
               "skipped_steps": sum(1 for h in history if h.get("skipped")),
               # The median step speed (the first steps warm up) and the largest peak memory of any rank.
               "tokens_per_s_median": speeds[len(speeds) // 2] if speeds else None, "peak_mem_gb_max": peak.item(),
               # This process's share: from start-up to the first step, and the steps themselves.
               "startup_s": plan.startup_s, "train_time_s": sum(h.get("time_s", 0.0) for h in history),
               "train_tokens": int(sum(h.get("tokens", 0) for h in history)),
               "replicas_identical": replicas_identical, "zero_stage": zero_stage(plan.ds_config), "dtype": plan.dtype,
               "load_in_4bit": cfg.load_in_4bit, "backbone_partition": backbone_partition(engine.module, world, device),
               "history": history}
    if rank == 0:
        write_file_atomically(output_dir / "summary.json", json.dumps(summary, indent=1))
        log(f"adapter: {output_dir / 'adapter'}")
    return summary


class TrainingStopped(RuntimeError):
    """The run stopped itself (repeated non-finite steps); the message says where the last good state is."""


def main(argv: list[str] | None = None) -> int:
    # Every rank reports: an error on one rank alone (a node-local path) must not go unsaid.
    rank = int(os.environ.get("RANK", "0"))
    prefix = f"error (rank {rank}): " if rank else "error: "
    try:
        train(parse_config(argv))
    except UserError as err:
        print(f"{prefix}{err}", file=sys.stderr, flush=True)
        return 2
    except TrainingStopped as err:
        print(f"{prefix}{err}", file=sys.stderr, flush=True)
        return 3
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    code = main()
    # Everything is written and closed by now. Skip the interpreter's teardown: there, C++ objects left
    # by gloo/ZeRO-3 (pending work handles holding tensors) are destroyed in no set order, and on rare runs
    # that aborted a rank with SIGABRT ("terminate called without an active exception") after a run that
    # had finished and saved everything, so the launcher reported a failure that was not one.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
