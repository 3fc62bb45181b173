"""The Trainer: one object that the launcher, the benchmark and the experiments all call.

Lifecycle (each a method; `fit` runs them in order):

    trainer = Trainer(cfg)   # preflight: every check a user can fail, the data tokenized; no run output yet
    trainer.setup()          # process group, backbone + MSPLoRA, deepspeed.initialize, the memory budget's probe
                             # (--activation_memory_gb), resume, step-0 eval
    trainer.train()          # step() until the planned number of steps; evaluate() and save() on schedule
    summary = trainer.finish()   # replicas compared, final adapter, analysis report, summary.json
    trainer.close()          # the scalar trackers (TensorBoard, wandb, mlflow; also after an error)

The loss of a step is the token mean over the whole global batch, whatever its split into ranks,
micro-batches and accumulation steps: every rank counts the global batch's loss tokens itself, and the
backward undoes DeepSpeed's averaging over ranks and accumulation steps.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import shutil
import signal
import sys
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
import torch.nn.functional as F

from msplora_dist.adapters.inject import adapter_params, apply_msplora, param_report
from msplora_dist.adapters.io import save_adapter
from msplora_dist.dist import zero
from msplora_dist.dist.ds_config import backbone_init_config, single_rank_zero3_note
from msplora_dist.dist.process import init_distributed
from msplora_dist.dist.signals import LauncherWatch, StopRequest, stop_agreed
from msplora_dist.errors import ConfigError, RunStopped, WriteFailed
from msplora_dist.train.backbone import load_backbone, set_eval_mode
from msplora_dist.train.config import TrainConfig, save_config_yaml
from msplora_dist.train.data import IGNORE_INDEX, collate, eval_batches
from msplora_dist.train.kernels import apply_liger, compile_decoder_layers, liger_feature
from msplora_dist.train.memory import checkpointed_layers, fit_activation_budget
from msplora_dist.train.preflight import Plan, preflight
from msplora_dist.train.schedule import lr_lambda
from msplora_dist.train.state import checkpoint_root, load_checkpoint, save_checkpoint
from msplora_dist.train.tracking import Tracker
from msplora_dist.utils.fileio import write_file_atomically
from msplora_dist.utils.log import log

HONOURED_ON_RESUME = ("lr", "warmup_ratio", "min_lr_ratio", "weight_decay")
"""Optimisation flags a resume may change: the new values apply from the next step (state.REFUSED_ON_RESUME: those
it may not)."""


class TrainingStopped(RunStopped):
    """The run stopped itself (repeated non-finite steps); the message says where the last good state is."""


class TrainingInterrupted(TrainingStopped):
    """A stop signal (SIGTERM, SIGINT, the launcher's death) ended the run at a step boundary, after a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention for a process ended by that signal


def peak_memory_gb(device: torch.device) -> float:
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


def check_adapters_fp32(model) -> None:
    """The adapters train, accumulate their gradients and are saved in fp32 whatever --dtype (ds_config.py)."""
    wrong = [(name, p.dtype) for name, p in adapter_params(model).items() if p.dtype != torch.float32]
    if wrong:
        raise RuntimeError(f"{len(wrong)} adapter tensor(s) are not fp32 after deepspeed.initialize (first: {wrong[0][0]}, "
                           f"{wrong[0][1]}); the adapters must train in fp32")


def injected_nan_steps() -> set[int]:
    """Fault injection for the tests of the failure path: MSPLORA_INJECT_NAN_AT_STEPS="3,5" makes the
    loss of those (1-based) steps NaN, as a diverging batch would."""
    value = os.environ.get("MSPLORA_INJECT_NAN_AT_STEPS", "")
    return {int(v) for v in value.split(",") if v.strip()}


def token_loss_sum(model, batch: dict, *, from_labels: bool = False) -> torch.Tensor:
    """Sum over the micro-batch of the next-token cross-entropies of every labelled token, in fp32.

    from_labels=False: from the logits, here. from_labels=True: the model computes it from `labels` (the same
    shift and ignore_index), which is where Liger's fused linear cross-entropy runs (in training mode) without ever
    forming the logits; num_items_in_batch=1 turns transformers' (and Liger's) token mean into the sum."""
    batch = dict(batch)
    labels = batch.pop("labels")
    if from_labels:
        return model(**batch, labels=labels, use_cache=False, num_items_in_batch=1).loss.float()
    logits = model(**batch, use_cache=False).logits  # with a cache, transformers ignores packed position_ids
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


class Trainer:
    """Fine-tunes cfg.model with MSPLoRA on DeepSpeed; see the module docstring for the lifecycle."""

    def __init__(self, cfg: TrainConfig):
        import datasets

        datasets.disable_progress_bars()  # one summary line per split instead (preflight.prepare_data)
        self.cfg = cfg
        self.on_gpu = torch.cuda.is_available()
        self.plan: Plan = preflight(cfg, int(os.environ.get("WORLD_SIZE", "1")), self.on_gpu)
        self.output_dir = Path(cfg.output_dir)
        self.engine = self.scheduler = self.writer = None
        self.step_count, self.history = 0, []
        self.nonfinite_in_a_row = 0
        self.startup_s = 0.0
        self.speed_features: list[str] = []
        self.memory_plan = None  # --activation_memory_gb: memory.MemoryPlan
        self._nan_steps = injected_nan_steps()
        # Every step needs the loss-token count of its whole global batch: read the column once, not a row per step.
        self._loss_tokens = list(self.plan.train_ds["num_loss_tokens"])
        self.stop_request, self._watch = StopRequest(), None

    # ------------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Start the process group, build the engine, restore a checkpoint, and evaluate where training starts."""
        cfg, plan = self.cfg, self.plan
        self.stop_request.install()  # from here on a signal stops the run at a step boundary, with a checkpoint
        self._watch = LauncherWatch(self.stop_request).start()
        self.rank, self.world = init_distributed(self.on_gpu)
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.on_gpu else torch.device("cpu")
        if cfg.overwrite and self.rank == 0:  # everything an earlier run wrote, so nothing of it is mistaken for this run's
            for earlier in (checkpoint_root(self.output_dir), self.output_dir / "adapter", self.output_dir / "analysis",
                            self.output_dir / "tb", self.output_dir / "wandb", self.output_dir / "mlartifacts"):
                shutil.rmtree(earlier, ignore_errors=True)
            for earlier_file in ("summary.json", "mlflow.db"):
                (self.output_dir / earlier_file).unlink(missing_ok=True)
        self.engine, self.scheduler = self._build_engine()
        if cfg.activation_memory_gb is not None:
            self._fit_activation_budget()
        if self.rank == 0:
            save_config_yaml(cfg, self.output_dir / "train_config.yaml")
            write_file_atomically(self.output_dir / "ds_config.json", json.dumps(plan.ds_config, indent=2))
        backbone = f"{plan.dtype}, 4-bit backbone" if cfg.load_in_4bit else plan.dtype
        if self.world == 1 and (plan.zero_stage == 3 or plan.demoted_zero3):
            log(single_rank_zero3_note(plan.ds_config, demoted=plan.demoted_zero3))
        log(f"run: {plan.total_steps} steps of a global batch of {plan.sampler.global_batch} (micro {cfg.micro_batch_size} x accum "
            f"{cfg.grad_accum} x {self.world} ranks), ZeRO-{plan.zero_stage}, {backbone}, lr {cfg.lr:g}; "
            f"full config in {self.output_dir / 'train_config.yaml'}")
        if plan.resume_dir is not None:
            self._resume()
        if self.rank == 0:  # TensorBoard, wandb, mlflow: whichever --report_to names (train/tracking.py)
            self.writer = Tracker(cfg.report_to, self.output_dir, cfg.to_dict())
        if plan.eval_ds is not None and self.step_count == 0 and cfg.eval_steps:
            # Where the base model starts, so the log shows how far training moved it.
            loss0, ppl0 = self.evaluate()
            log(f"step 0/{plan.total_steps}  eval_loss {loss0:.4f}  eval_ppl {ppl0:.2f}")
            self.history.append({"step": 0, "eval_loss": loss0, "eval_ppl": ppl0})
            self._log_scalars(self.history[-1])
        self.engine.train()
        self.startup_s = time.time() - psutil.Process().create_time()  # imports, loading, DeepSpeed set-up

    def _build_engine(self):
        """Frozen backbone + MSPLoRA hierarchy, wrapped by DeepSpeed with warmup + cosine. The one place in the
        repository that calls deepspeed.initialize."""
        import deepspeed

        cfg, plan = self.cfg, self.plan
        if plan.liger:  # patches the model classes: before the model is built
            apply_liger(plan.model_type, layers_compiled=plan.compile_layers)
        model = load_backbone(plan.model_dir, dtype=plan.dtype, load_in_4bit=cfg.load_in_4bit,
                              ds_config=backbone_init_config(plan.ds_config, plan.dtype),
                              gradient_checkpointing=cfg.gradient_checkpointing or cfg.activation_memory_gb is not None,
                              attn_implementation=cfg.attn_implementation)
        torch.manual_seed(cfg.seed)  # the same adapter init on every rank
        model = apply_msplora(model, plan.adapter_config)
        speed = [liger_feature(plan.compile_layers)] if plan.liger else []
        if plan.zero_stage == 3:
            zero.register_adapters_with_zero3(model)
            if cfg.zero3_leaf_layers:
                speed.append(f"ZeRO-3 leaf modules ({zero.set_z3_leaf_layers(model).__name__})")
            if plan.liger:
                zero.register_lm_head_with_zero3(model)
        if plan.compile_layers:  # after set_z3_leaf_layers, which names the layer class
            speed.append(f"compiled decoder layers ({compile_decoder_layers(model)})")
        log(str(param_report(model)))
        if speed:
            log(f"speed: {', '.join(speed)}")
        self.speed_features = speed
        schedule = lr_lambda(plan.total_steps, cfg.warmup_ratio, cfg.min_lr_ratio)
        engine, _, _, scheduler = deepspeed.initialize(
            model=model, model_parameters=list(adapter_params(model).values()), config=plan.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        )
        zero.persist_adapters(engine.module, engine.optimizer)
        zero.check_adapters_replicated(engine.module, plan.ds_config)
        check_adapters_fp32(engine.module)
        return engine, scheduler

    def _fit_activation_budget(self) -> None:
        """--activation_memory_gb: probe the engine's model through this run's loss, then checkpoint only the layers the
        budget needs (train/memory.py). After deepspeed.initialize: `auto` reads the memory the model and optimizer
        left, and the probe runs as training does (device, kernels, ZeRO's hooks)."""
        cfg = self.cfg
        plan = self.memory_plan = fit_activation_budget(
            self.engine.module, self.loss_sum, setting=cfg.activation_memory_gb, micro_batch_size=cfg.micro_batch_size,
            max_seq_len=cfg.max_seq_len, packing=cfg.packing, device=self.device)
        log(plan.describe())
        self.speed_features.append(f"activation checkpointing: {plan.checkpointed_layers} of {plan.profile.n_layers} layers "
                                   f"(--activation_memory_gb {cfg.activation_memory_gb})")

    def _resume(self) -> None:
        plan = self.plan
        # This run's optimizer settings (lr, weight_decay, betas, eps from the flags and the ds_config), before the
        # checkpoint's param_groups overwrite them: the checkpoint supplies state (moments, step), not settings.
        settings = [{k: v for k, v in group.items() if k != "params"} for group in self.scheduler.optimizer.param_groups]
        state = load_checkpoint(self.engine, plan.resume_dir, checkpoint_root(self.output_dir))
        self.step_count, self.history = state["step"], state["history"]
        self._apply_settings(settings)
        log(f"resumed from {plan.resume_dir} at step {self.step_count}")
        saved = state.get("config", {})
        changed = [f"{k} {saved[k]:g} -> {getattr(self.cfg, k):g}" for k in HONOURED_ON_RESUME
                   if k in saved and saved[k] != getattr(self.cfg, k)]
        if changed:
            log(f"resume: this run's {', '.join(changed)} apply from step {self.step_count + 1} on (the schedule keeps its "
                "position; the checkpoint's values are not used)")
        if state.get("total_steps") not in (None, plan.total_steps):
            log(f"note: the checkpoint's run had {state['total_steps']} steps, this one has {plan.total_steps}: the warmup + cosine "
                "schedule is recomputed for the new length, so the learning rate jumps at the resume")
        if self.step_count >= plan.total_steps:
            log(f"note: the checkpoint is at step {self.step_count} of {plan.total_steps}: nothing is left to train; the final "
                "adapter is written again. Raise --max_steps or --epochs to train further")

    def _apply_settings(self, settings: list[dict]) -> None:
        """Put this run's optimizer settings back after a checkpoint load, and its schedule (peak lr, warmup, min lr:
        the lambda is this run's, never saved) at the checkpoint's position, through the scheduler's own state."""
        groups, scheduler = self.scheduler.optimizer.param_groups, self.scheduler
        base = [self.cfg.lr] * len(groups)
        # One schedule step per training step, skipped ones included (step()): the position is the step count.
        lrs = [b * scheduler.lr_lambdas[0](self.step_count) for b in base]
        scheduler.load_state_dict(scheduler.state_dict() | {"base_lrs": base, "_last_lr": lrs, "last_epoch": self.step_count})
        for group, mine, lr, b in zip(groups, settings, lrs, base, strict=True):
            group.update(mine)
            group.update(lr=lr, initial_lr=b)

    # ------------------------------------------------------------------------------------------ steps

    def loss_sum(self, batch: dict) -> torch.Tensor:
        """Sum of the shifted token cross-entropies of one micro-batch, in fp32 (token_loss_sum)."""
        return token_loss_sum(self.engine, {k: v.to(self.device) for k, v in batch.items()}, from_labels=self.plan.liger)

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Token-weighted eval loss and perplexity over the whole eval set, identical on every rank."""
        eval_ds, pad_id = self.plan.eval_ds, self.plan.tokenizer.pad_token_id
        set_eval_mode(self.engine.module)
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for indices in eval_batches(len(eval_ds), self.cfg.micro_batch_size, self.rank, self.world):
            # A rank whose share ran out still runs a forward (ZeRO-3 gathers are collective), on a
            # stand-in example that it does not count.
            examples = [eval_ds[i] for i in indices] if indices else [eval_ds[0]]
            ce = self.loss_sum(collate(examples, pad_id))
            if indices:
                totals[0] += ce.double()
                totals[1] += sum(e["num_loss_tokens"] for e in examples)
        dist.all_reduce(totals)
        self.engine.train()
        loss = (totals[0] / totals[1]).item()
        return loss, math.exp(min(loss, 50.0))

    def step(self) -> dict:
        """One optimizer step on the next global batch; returns its record (train() adds evaluation and appends it to
        history; a caller of step() alone, the benchmark, keeps the records itself)."""
        cfg, plan, engine = self.cfg, self.plan, self.engine
        train_ds, sampler, pad_id = plan.train_ds, plan.sampler, plan.tokenizer.pad_token_id
        t0 = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]  # the rate this step's update uses (engine.step advances the schedule)
        indices = sampler.global_batch_indices(self.step_count)
        # Every rank computes the global batch's loss-token count itself: the loss is the token mean
        # over the whole global batch, whatever the split into ranks and micro-batches.
        n_global = sum(self._loss_tokens[i] for i in indices)
        stats = torch.zeros(2, dtype=torch.float64, device=self.device)
        for accum_step in range(cfg.grad_accum):
            micro = sampler.micro_batch_indices(self.step_count, accum_step, self.rank, self.world, cfg.micro_batch_size)
            examples = [train_ds[i] for i in micro]
            ce = self.loss_sum(collate(examples, pad_id))
            if self.step_count + 1 in self._nan_steps:
                ce = ce * float("nan")
            # DeepSpeed divides by grad_accum and averages over ranks; undo both so the gradient is
            # d(sum of token losses / n_global).
            engine.backward(ce * (self.world * cfg.grad_accum / n_global))
            engine.step()  # the optimizer steps at the accumulation boundary only
            # No .item() here: a host sync per micro-batch would stall the GPU's queue of kernels.
            stats[0] += ce.detach().double()
            stats[1] += sum(len(e["input_ids"]) for e in examples)
        dist.all_reduce(stats)
        self.step_count += 1
        step = self.step_count
        loss = stats[0].item() / n_global
        # DeepSpeed's ZeRO optimizers skip the update when the gradient norm is not finite.
        applied = engine.was_step_applied()
        self.nonfinite_in_a_row = 0 if applied and math.isfinite(loss) else self.nonfinite_in_a_row + 1
        if applied and not math.isfinite(loss):
            raise TrainingStopped(f"step {step}: the loss is {loss} but the optimizer applied the update; the adapters may "
                                  "be corrupt (this should not happen with ZeRO stage >= 1), stopping")
        if not applied:
            # DeepSpeed steps the schedule only with an applied update; the schedule counts steps, so that after skipped
            # ones the cosine still ends where an uninterrupted run's does.
            self.scheduler.step()
        grad_norm = engine.get_global_grad_norm()
        record = {"step": step, "loss": loss, "lr": lr,
                  "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                  "tokens": int(stats[1].item()), "time_s": time.perf_counter() - t0}
        record["tokens_per_s"] = record["tokens"] / record["time_s"]
        if not applied:
            record["skipped"] = True
            log(f"step {step}: non-finite loss or gradient (loss {loss}); update skipped "
                f"({self.nonfinite_in_a_row} in a row, the run stops at {cfg.max_nonfinite_steps})")
        return record

    def train(self) -> None:
        """step() until the planned number of steps, with evaluation, logging and checkpoints on schedule."""
        from tqdm import tqdm

        cfg, total_steps = self.cfg, self.plan.total_steps
        bar = tqdm(total=total_steps, initial=self.step_count, disable=self.rank != 0, dynamic_ncols=True, desc="train",
                   mininterval=0.5 if sys.stderr.isatty() else 10.0)
        try:
            while self.step_count < total_steps:
                record = self.step()
                step, loss = record["step"], record["loss"]
                bar.update(1)
                # refresh=False: the bar redraws at its own interval (10 s into a log file), not at every step.
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
                stop = bool(cfg.max_nonfinite_steps) and self.nonfinite_in_a_row >= cfg.max_nonfinite_steps
                if self.plan.eval_ds is not None and not stop and (
                        (cfg.eval_steps and step % cfg.eval_steps == 0) or step == total_steps):
                    record["eval_loss"], record["eval_ppl"] = self.evaluate()
                    log(f"step {step}/{total_steps}  loss {loss:.4f}  eval_loss {record['eval_loss']:.4f}  "
                        f"eval_ppl {record['eval_ppl']:.2f}")
                record["peak_mem_gb"] = peak_memory_gb(self.device)
                self.history.append(record)
                self._log_scalars(record)
                path = None
                if stop or (cfg.save_steps and step % cfg.save_steps == 0) or step == total_steps:
                    # After skipped steps the adapters are those of the last good step: this checkpoint holds them.
                    path = self.save()
                signum = stop_agreed(self.stop_request, self.device)  # every rank stops after the same step
                if signum and not stop and step < total_steps:  # on the last step the run is done: finish() writes it
                    path = path or self.save()
                    raise TrainingInterrupted(f"stopped by {signal.Signals(signum).name} after step {step}/{total_steps}; "
                                              f"checkpoint {path}: continue with --resume latest", signum)
                if stop:
                    raise TrainingStopped(f"{self.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (steps "
                                          f"{step - self.nonfinite_in_a_row + 1}-{step}); the last good state is in {path}. "
                                          "Lower --lr, check the data, or resume with --resume latest")
        finally:
            bar.close()

    def _log_scalars(self, record: dict) -> None:
        if self.writer is None or not (record["step"] % self.cfg.log_steps == 0 or "eval_loss" in record):
            return
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_gb", "eval_loss", "eval_ppl"):
            if key in record and math.isfinite(record[key]):
                self.writer.add_scalar(f"eval/{key[5:]}" if key.startswith("eval") else f"train/{key}", record[key], record["step"])

    def save(self) -> Path:
        """A training checkpoint of the current step (collective: every rank calls it)."""
        plan = self.plan
        state = {"step": self.step_count, "world_size": self.world, "zero_stage": plan.zero_stage,
                 "dtype": plan.dtype, "num_train_examples": plan.sampler.num_examples, "total_steps": plan.total_steps,
                 "history": self.history, "config": self.cfg.to_dict()}
        path = save_checkpoint(self.engine, self.output_dir, self.step_count, state, self.cfg.keep_last,
                               base_model=self.base_model)
        log(f"checkpoint: {path}")
        return path

    @property
    def base_model(self) -> Path:
        """The base every adapter this run writes records, for export, sampling and serving: the model as loaded
        (a Hub name's local snapshot, a GGUF file)."""
        return Path(self.plan.model_dir).resolve()

    # ------------------------------------------------------------------------------------------ the end

    def finish(self) -> dict:
        """Check the replicas agree, write the final adapter, the analysis report and summary.json."""
        cfg, plan, engine, history = self.cfg, self.plan, self.engine, self.history
        # Under ZeRO-3 the adapters are persistent but start partitioned, and a checkpoint or an eval may leave
        # them so: gather them for everything below, or the digest would compare empty tensors.
        with zero.gathered(list(adapter_params(engine.module).values())):
            # The shared adapters must be bit-identical on every rank: check the fingerprints agree.
            digests = [None] * self.world
            dist.all_gather_object(digests, adapter_digest(engine.module))
            replicas_identical = len(set(digests)) == 1
            if not replicas_identical:
                raise RuntimeError("the adapter replicas differ across ranks after training; this is a bug, please report it")
            try:
                # Atomic: nothing partial is left on failure. The base is recorded for export and serving.
                save_adapter(engine.module, self.output_dir / "adapter", base_model=self.base_model)
            except (OSError, ConfigError) as err:
                reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
                raise WriteFailed(f"writing the final adapter to {self.output_dir / 'adapter'} failed: {reason}; the training "
                                  "is in the last checkpoint: free space, then --resume latest writes it again") from None
            if cfg.analyze:
                from msplora_dist.analysis import analyze_model, tensorboard_scalars, write_report

                report = analyze_model(engine.module)
                if self.rank == 0:
                    write_report(report, self.output_dir / "analysis")
                    for tag, value in tensorboard_scalars(report).items():
                        self.writer.add_scalar(tag, value, plan.total_steps)
                    log(f"analysis: {self.output_dir / 'analysis' / 'index.html'}")
        evals = [h["eval_loss"] for h in history if "eval_loss" in h]
        speeds = sorted(h["tokens_per_s"] for h in history if "tokens_per_s" in h and not h.get("skipped"))
        peak = torch.tensor([peak_memory_gb(self.device)], dtype=torch.float64, device=self.device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        losses = [h["loss"] for h in history if "loss" in h]
        summary = {"steps": history[-1]["step"] if history else 0, "world_size": self.world,
                   "global_batch": plan.sampler.global_batch, "final_loss": losses[-1] if losses else None,
                   "first_eval_loss": evals[0] if evals else None, "final_eval_loss": evals[-1] if evals else None,
                   "skipped_steps": sum(1 for h in history if h.get("skipped")),
                   # The median step speed (the first steps warm up) and the largest peak memory of any rank.
                   "tokens_per_s_median": speeds[len(speeds) // 2] if speeds else None, "peak_mem_gb_max": peak.item(),
                   # This process's share: from start-up to the first step, and the steps themselves.
                   "startup_s": self.startup_s, "train_time_s": sum(h.get("time_s", 0.0) for h in history),
                   "train_tokens": int(sum(h.get("tokens", 0) for h in history)),
                   "replicas_identical": replicas_identical, "zero_stage": plan.zero_stage, "zero3_as_zero2": plan.demoted_zero3,
                   "dtype": plan.dtype,
                   "load_in_4bit": cfg.load_in_4bit, "speed_features": self.speed_features,
                   "checkpointed_layers": checkpointed_layers(engine.module),
                   "activation_memory": self.memory_plan.to_dict() if self.memory_plan else None,
                   "backbone_partition": zero.backbone_partition(engine.module, self.world, self.device),
                   "history": history}
        if self.rank == 0:
            write_file_atomically(self.output_dir / "summary.json", json.dumps(summary, indent=1))
            log(f"adapter: {self.output_dir / 'adapter'}")
        return summary

    def close(self) -> None:
        """Close the trackers (a stopped run keeps its scalars up to the stop) and release the engine, so
        that one process can run many trainers one after another (the benchmark, the experiments). The process
        group stays up for the next one; the entry point shuts it down (dist.process.shutdown_distributed)."""
        self.stop_request.uninstall()
        if self._watch is not None:
            self._watch.stop()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.engine is not None:
            self.engine.destroy()  # ZeRO-3's hooks and buffers; a later engine in this process must not see them
            self.engine = self.scheduler = None
            if self.on_gpu:
                torch.cuda.empty_cache()

    def fit(self) -> dict:
        """setup, train, finish; returns the summary."""
        try:
            self.setup()
            self.train()
            return self.finish()
        finally:
            self.close()
