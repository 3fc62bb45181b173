"""Grid cells trained in-process: long-lived worker processes, each running the cells it is handed one after
another with msplora_dist's Trainer. Python, torch, DeepSpeed and the process group come up once per worker,
not once per cell; Trainer.close releases each cell's engine and the process group stays up for the next.

The scheduler (grid.py) starts one Worker per job slot and hands it cells through a pipe. A cell's failure is
its result, never the worker's end: the worker sends {"status": "error", "error": ...} and goes on. After a
failure other than bad input (which fails in preflight, before anything is built), the worker retires, so the
next cell starts in a fresh process rather than next to whatever the failure left behind (a broken CUDA
context, a half-built engine); the scheduler replaces it. A worker that dies (killed at the deadline, a
crash) takes only its current cell with it: the scheduler records a crash as that cell's error.

Every cell's output (the trainer's log, DeepSpeed's, a traceback) goes to its own train.log: the worker
points file descriptors 1 and 2 at it for the cell's duration.

This module is imported by the scheduler too, so it imports nothing heavy at module level: a worker's
environment (CUDA_VISIBLE_DEVICES, DS_ACCELERATOR, OMP_NUM_THREADS) is set when it starts, before torch and
DeepSpeed are imported.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from experiments.quality import qlib


@contextlib.contextmanager
def output_to(path: Path):
    """Send everything this process writes to stdout and stderr (also from C code) to `path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(path, "w") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def train_and_evaluate(values: dict, evaluation: dict | None, out_dir: Path) -> dict | None:
    """Trainer(TrainConfig(**values)): setup, train, finish (Trainer.fit's steps); then, with `evaluation`
    ({"rows": path, "metric", "max_new_tokens", "batch_size"}), the task metric on the model just trained
    (generation.evaluate_model, generations to out_dir/generations.jsonl), before the engine is released."""
    from experiments.quality.generation import evaluate_model
    from msplora_dist.train.config import TrainConfig
    from msplora_dist.train.trainer import Trainer

    trainer = Trainer(TrainConfig(**values))
    try:
        trainer.setup()
        trainer.train()
        trainer.finish()
        if not evaluation:
            return None
        return evaluate_model(trainer.engine.module, trainer.plan.tokenizer, qlib.read_jsonl(evaluation["rows"]), evaluation["metric"],
                              max_new_tokens=evaluation["max_new_tokens"], batch_size=evaluation["batch_size"],
                              max_seq_len=values["max_seq_len"], micro_batch_size=values["micro_batch_size"],
                              out_path=out_dir / "generations.jsonl")
    finally:
        trainer.close()


def run_cell(values: dict, out_dir: Path, evaluation: dict | None = None) -> dict:
    """Train one cell in this process (train_and_evaluate), its output in out_dir/train.log. Returns
    {"status": "ok" | "diverged" | "error", "error", "wall_s", "retire", "evaluation"}; the cell's own failure is
    returned, never raised."""
    from msplora_dist.errors import UserError
    from msplora_dist.train.trainer import TrainingStopped

    t0 = time.perf_counter()
    status, error, retire, result = "ok", None, False, None
    with output_to(out_dir / "train.log"):
        try:
            result = train_and_evaluate(values, evaluation, out_dir)
        except TrainingStopped as err:  # the trainer stopped itself after repeated non-finite steps: a result
            status, error = "diverged", str(err)
        except UserError as err:  # bad input, found before anything was built: the process is as it was
            status, error = "error", f"{type(err).__name__}: {err}"
            print(f"error: {err}", file=sys.stderr)
        except Exception as err:  # anything else is this cell's error; a fresh worker takes the next cell
            status, error, retire = "error", f"{type(err).__name__}: {err}", True
            traceback.print_exc()
    return {"status": status, "error": error, "wall_s": round(time.perf_counter() - t0, 2), "retire": retire, "evaluation": result}


def _die_with_parent() -> None:
    """Linux: be killed when the scheduler dies, so no orphan keeps training into a cell directory that a
    rerun reuses."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def serve(conn, slot: int) -> None:
    """A worker process's main: run each {"values", "out_dir", "evaluation"} received on conn, send back its outcome;
    stop on None or when the scheduler is gone."""
    _die_with_parent()
    os.chdir(qlib.REPO)  # cells' paths are relative to the repository, as in their recorded commands
    qlib.offline_env()
    env = qlib.env_info()
    done = 0
    try:
        while True:
            try:
                job = conn.recv()
            except EOFError:  # the scheduler is gone
                break
            if job is None:
                break
            outcome = run_cell(job["values"], Path(job["out_dir"]), job.get("evaluation"))
            outcome.update(env=env, worker={"slot": slot, "pid": os.getpid(), "cells_before": done})
            done += 1
            conn.send(outcome)
            if outcome["retire"]:
                break
    finally:
        from msplora_dist.dist.process import shutdown_distributed

        shutdown_distributed()


class Worker:
    """The scheduler's handle on one worker process: submit a cell, poll for its outcome, stop or kill it."""

    def __init__(self, slot: int, env: dict[str, str]):
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no CUDA or thread state of ours
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(child, slot), name=f"grid-worker-{slot}")
        # The child's environment is ours when it starts: set its variables for that moment only.
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            self.proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        child.close()
        self.busy_since: float | None = None

    def submit(self, values: dict, out_dir: Path, evaluation: dict | None = None) -> None:
        self.conn.send({"values": values, "out_dir": str(out_dir), "evaluation": evaluation})
        self.busy_since = time.perf_counter()

    def poll(self) -> dict | None:
        """The outcome of the submitted cell once it is there; if the process died instead, an error outcome."""
        try:
            if self.conn.poll():
                self.busy_since, outcome = None, self.conn.recv()
                return outcome
        except (EOFError, OSError):
            pass
        else:
            if self.proc.is_alive():
                return None
        self.proc.join(timeout=5)
        wall = time.perf_counter() - (self.busy_since or time.perf_counter())
        self.busy_since = None
        return {"status": "error", "error": f"the worker process {self.proc.pid} ended (exit code {self.proc.exitcode}) "
                "during the cell", "wall_s": round(wall, 2), "retire": True}

    def sentinels(self) -> list:
        return [self.conn, self.proc.sentinel]

    def request_stop(self) -> None:
        """Ask the worker to end once its current cell is done (several can wind down at once)."""
        with contextlib.suppress(OSError):
            self.conn.send(None)

    def stop(self, timeout: float = 60) -> None:
        """Let the worker end by itself (it shuts its process group down), else kill it."""
        self.request_stop()
        self.proc.join(timeout)
        self.kill()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)
        self.conn.close()
