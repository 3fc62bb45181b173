"""Training checkpoints: {output_dir}/checkpoints/step-{N:08d}/ holds

    adapter/            the adapter hierarchy (save_adapter format: each shared tensor once)
    ds/                 DeepSpeed's optimizer and scheduler state (engine.save_checkpoint, adapters only,
                        exclude_frozen_parameters: the frozen backbone is never written)
    rng-rank{r}.pt      every rank's RNG states, for exact dropout on resume
    trainer_state.json  step, data position, losses so far, the run's config
    manifest.json       size and sha256 of every file above; written last

All ranks write into a temporary sibling (.tmp-step-{N}), rank 0 writes the manifest and renames it.
A directory without a matching manifest is never taken for a checkpoint, so a kill at any moment
leaves the previous checkpoint as the latest valid one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from msplora_dist.adapters.io import load_adapter, read_adapter_config, save_adapter
from msplora_dist.dist.zero import gathered
from msplora_dist.errors import CheckpointError, ConfigError, WriteFailed
from msplora_dist.utils.fileio import verify_manifest, write_manifest

STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# What every checkpoint's manifest lists (save_checkpoint writes them all): a manifest without one of them is not a
# trainer's checkpoint, however well its listed files match.
REQUIRED_FILES = ("trainer_state.json", "adapter/", "ds/", "rng-rank0.pt")


def verify_checkpoint(directory: Path) -> str | None:
    """None if `directory` is a complete checkpoint, else what is wrong with it."""
    problem = verify_manifest(directory)
    if problem is not None:
        return problem
    listed = json.loads((directory / "manifest.json").read_text())["files"]
    absent = [name for name in REQUIRED_FILES
              if not any(rel == name or (name.endswith("/") and rel.startswith(name)) for rel in listed)]
    if absent:
        return f"its manifest lists no {', '.join(absent)} (not a checkpoint the trainer wrote)"
    try:
        state = json.loads((directory / "trainer_state.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        state = None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not isinstance(state.get("world_size"), int):
        return "its trainer_state.json has no integer step and world_size"
    missing = [f"rng-rank{r}.pt" for r in range(state["world_size"]) if f"rng-rank{r}.pt" not in listed]
    if missing:
        return f"its manifest lists no {missing[0]} of its {state['world_size']} ranks"
    return None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)), key=lambda p: p.name)


def find_resume_dir(output_dir: str | Path, resume: str, log=print) -> Path:
    """'latest' -> the newest valid checkpoint; else the given directory, which must be valid."""
    if resume != "latest":
        path = Path(resume)
        problem = verify_checkpoint(path) if path.is_dir() else "no such directory"
        if problem and path.is_dir() and any(STEP_DIR.match(p.name) for p in path.iterdir()):
            problem = "it is a folder of checkpoints, not one; pass one of its step-N folders, or --resume latest"
        if problem:
            raise CheckpointError(f"--resume {str(path)!r}: {problem}; expected a checkpoint directory written by the trainer")
        return path
    for path in reversed(list_checkpoints(output_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        log(f"skipping checkpoint {path}: {problem}")
    raise CheckpointError(f"--resume latest: no valid checkpoint in {str(checkpoint_root(output_dir))!r}")


def check_resume_compatible(directory: Path, adapter_config, hf_config: dict, run: dict) -> int:
    """Refuse, before anything is loaded, a checkpoint from another adapter layout, model, global batch,
    ZeRO stage or dtype (run: this run's global_batch, zero_stage and resolved dtype). Returns the number
    of ranks that wrote it (another number is fine: see load_checkpoint)."""
    saved, meta = read_adapter_config(directory / "adapter")
    mine, theirs = adapter_config.to_dict(), saved.to_dict()
    for key in ("ranks", "alphas", "target_modules", "groups", "use_rslora"):
        if mine[key] != theirs[key]:
            raise CheckpointError(f"--resume {str(directory)!r} has adapter {key}={theirs[key]}; this run has {key}={mine[key]}")
    signature = meta["signature"]
    for key, ours in (("model_type", hf_config.get("model_type")), ("hidden_size", hf_config.get("hidden_size")),
                      ("num_layers", hf_config.get("num_hidden_layers"))):
        if signature.get(key) != ours:
            raise CheckpointError(f"--resume {str(directory)!r} was trained on a model with {key}={signature.get(key)!r}; "
                                  f"--model has {key}={ours!r}")
    state = json.loads((directory / "trainer_state.json").read_text())
    saved_config = state.get("config", {})
    saved_batch = saved_config.get("micro_batch_size", 0) * saved_config.get("grad_accum", 0) * state.get("world_size", 0) or None
    if saved_batch is not None and saved_batch != run["global_batch"]:
        # The data order and the schedule are defined per global batch: another size is another run.
        raise CheckpointError(
            f"--resume {str(directory)!r} was trained with a global batch of {saved_batch} sequences; this run has "
            f"{run['global_batch']} (micro_batch_size x grad_accum x ranks). Keep the global batch: choose --grad_accum so that "
            f"micro_batch_size x grad_accum x ranks = {saved_batch}"
        )
    # DeepSpeed's optimizer files differ by stage and precision, and its universal format does not carry them from one
    # stage to another (a stage-2 checkpoint's converted optimizer_state.pt lacks what stage 3 reads): resume with the
    # ones the run had. A ZeRO-3 config runs stage 2 on one rank (dist/ds_config.py), so the hint says how to keep 3.
    for key, flag in (("zero_stage", "ZeRO stage (--ds_config)"), ("dtype", "--dtype")):
        if state.get(key) is not None and state[key] != run[key]:
            hint = ""
            if key == "zero_stage" and (state[key], run[key]) == (3, 2):
                hint = " (a ZeRO-3 config runs stage 2 on one rank: --single_rank_zero3 keep runs stage 3 there)"
            elif key == "zero_stage" and (state[key], run[key]) == (2, 3):
                hint = (" (on one rank a ZeRO-3 config runs stage 2: resume with --ds_config ds_configs/zero2.json, which "
                        "continues it on any number of ranks; --single_rank_zero3 keep makes a one-rank run write stage 3)")
            raise CheckpointError(f"--resume {str(directory)!r} was trained with {key}={state[key]!r}; this run has "
                                  f"{key}={run[key]!r}. Resume with the same {flag}{hint}")
    return int(state["world_size"])


# Settings that decide which tokens each step sees: a resume that changed one would silently be another run.
DATA_ORDER_SETTINGS = ("seed", "max_seq_len", "packing", "train_on_prompt", "eval_fraction")
# DeepSpeed's ZeRO-1/2 optimizer restores its gradient clipping from the checkpoint (stage_1_and_2.py
# load_state_dict): a new value would silently not apply, so it is refused. lr, warmup_ratio, min_lr_ratio and
# weight_decay are honoured (trainer.HONOURED_ON_RESUME).
REFUSED_ON_RESUME = ("max_grad_norm",)


def check_resume_data(directory: Path, config: dict, num_train_examples: int) -> None:
    """Refuse a resume whose data settings or training examples differ from the checkpoint's."""
    state = json.loads((directory / "trainer_state.json").read_text())
    saved = state.get("config", {})
    for key in (*DATA_ORDER_SETTINGS, *REFUSED_ON_RESUME):
        if key in saved and saved[key] != config[key]:
            raise CheckpointError(f"--resume {str(directory)!r} was trained with {key}={saved[key]!r}; this run has "
                                  f"{key}={config[key]!r}. Resume with the same value, or start a new run (--overwrite true)")
    if state.get("num_train_examples") not in (None, num_train_examples):
        raise CheckpointError(f"--resume {str(directory)!r} was trained on {state['num_train_examples']} examples; this run's "
                              f"data gives {num_train_examples}. Resume with the same data, or start a new run (--overwrite true)")


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(engine, output_dir: str | Path, step: int, trainer_state: dict, keep_last: int,
                    base_model: str | Path | None = None) -> Path:
    """Collective: every rank calls it. Returns the final directory.

    A write that fails (a full disk, an I/O error) raises WriteFailed in one line, after removing the temporary folder:
    the previous checkpoint stays the latest. A failure in rank 0's part (the manifest, the rename) reaches every rank
    through a broadcast; one inside DeepSpeed's own collective save ends that rank, and the launcher ends the others.
    """
    root = checkpoint_root(output_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    try:
        if _is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        save_adapter(engine.module, tmp / "adapter", gather=gathered, base_model=base_model)
        engine.save_checkpoint(str(tmp / "ds"), tag="state", exclude_frozen_parameters=True, save_latest=False)
        rank = dist.get_rank() if dist.is_initialized() else 0
        torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    except (OSError, ConfigError, RuntimeError) as err:
        # ConfigError: write_dir_atomically could not create its folder; RuntimeError: torch.save reports a failed
        # write (ENOSPC included) as one, without an errno.
        raise _write_failed(tmp, final, err) from None
    _barrier()
    failure = [None]
    if _is_rank0():
        try:
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
            write_manifest(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as err:
            failure = [str(_write_failed(tmp, final, err))]
        else:
            for old in list_checkpoints(output_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.broadcast_object_list(failure, src=0)  # every rank stops with rank 0's message, none waits at a barrier
    if failure[0] is not None:
        raise WriteFailed(failure[0])
    return final


FULL_DISK_BYTES = 1 << 20
"""Less free space than this after a failed write is reported as a full disk (torch.save's error does not say)."""


def _write_failed(tmp: Path, final: Path, err: Exception) -> WriteFailed:
    """Remove the partial folder; the error names what failed and which checkpoint is now the latest."""
    if isinstance(err, OSError) and err.strerror:
        reason = f"{err.strerror} ({err.filename})" if err.filename else err.strerror
    else:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        free = shutil.disk_usage(final.parent).free if final.parent.exists() else None
        if free is not None and free < FULL_DISK_BYTES:
            reason = f"No space left on device ({free // 1024} kB free; {reason})"
    shutil.rmtree(tmp, ignore_errors=True)  # after measuring the free space, which the partial folder uses up
    latest = next((p for p in reversed(list_checkpoints(final.parent.parent)) if verify_checkpoint(p) is None), None)
    return WriteFailed(f"writing checkpoint {final} failed: {reason}; its partial folder was removed, and the latest "
                       f"checkpoint is {latest if latest else 'none (the run has none yet)'}")


def load_checkpoint(engine, directory: Path, scratch_root: Path) -> dict:
    """Restore adapters, optimizer, scheduler and RNG; returns trainer_state. Check the checkpoint with
    check_resume_compatible first (and, for another number of ranks, build the engine with
    checkpoint.load_universal on: resolve_ds_config(load_universal=True)).

    The same number of ranks reloads DeepSpeed's own per-rank files and every rank's RNG state: the run
    continues bit for bit. Another number of ranks cannot read ZeRO's per-rank optimizer partitions, so
    rank 0 first converts them with DeepSpeed's own tool (deepspeed.checkpoint.ds_to_universal) into
    a folder under scratch_root (this run's checkpoints folder: the resumed checkpoint may be read-only), and
    every rank loads its new partition from there; the RNG is then seeded from (seed, step, rank), since the
    old ranks' dropout streams have no counterpart.
    """
    state = json.loads((directory / "trainer_state.json").read_text())
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    load_adapter(engine.module, directory / "adapter", gather=gathered)
    if state["world_size"] == world:
        engine.load_checkpoint(str(directory / "ds"), tag="state", load_module_strict=False,
                               load_optimizer_states=True, load_lr_scheduler_states=True)
        set_rng_state(torch.load(directory / f"rng-rank{rank}.pt", weights_only=False))
        return state
    universal = Path(scratch_root) / f".universal-{directory.name}"
    failure = [None]
    if rank == 0:
        try:
            convert_to_universal(directory / "ds" / "state", universal / "state")
        except (CheckpointError, OSError) as err:  # OSError: the scratch folder could not be written
            shutil.rmtree(universal, ignore_errors=True)
            failure = [str(err) if isinstance(err, CheckpointError) else
                       f"cannot write the converted checkpoint to {str(universal)!r} ({err.strerror or err})"]
    if dist.is_initialized():
        dist.broadcast_object_list(failure, src=0)  # every rank stops with the same message, none hangs
    if failure[0] is not None:
        raise CheckpointError(failure[0])
    try:
        engine.load_checkpoint(str(universal), tag="state", load_module_strict=False,
                               load_optimizer_states=True, load_lr_scheduler_states=True)
    finally:
        _barrier()
        if rank == 0:
            shutil.rmtree(universal, ignore_errors=True)
    seed = int(state.get("config", {}).get("seed", 0))
    reseed = (seed * 1_000_003 + int(state["step"]) * 1_009 + rank) % 2**63
    random.seed(reseed)
    torch.manual_seed(reseed)
    return state


def convert_to_universal(ds_dir: Path, out: Path) -> None:
    """DeepSpeed's checkpoint of N ranks -> its universal (rank-count independent) format, in a subprocess:
    the converter is a command-line tool with its own worker pools. Only the adapters' state is in it (a few MB)."""
    import subprocess
    import sys

    shutil.rmtree(out.parent, ignore_errors=True)
    out.parent.mkdir(parents=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ds_dir),
           "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--inject_missing_state"]  # the version key Megatron-style clients store; we have nothing else to add
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(out.parent, ignore_errors=True)
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]  # the exception line of its traceback
        raise CheckpointError(f"converting {str(ds_dir)!r} for a different number of ranks failed "
                              f"(deepspeed.checkpoint.ds_to_universal exited {proc.returncode}): {last}")
