"""The quality test's experiment grid: LoRA against MSPLoRA on one task, trained with the Trainer.

Run after pretrain.py and make_task.py, on the same root, from the repository root (ZeRO-2, one GPU per cell;
finished cells are skipped, so repeated calls continue the grid):

    python -m experiments.quality.grid --root runs/quality --dry_run                  # the plan, parameter counts
    python -m experiments.quality.grid --root runs/quality --jobs 4 --deadline_s 500  # one device call
    python -m experiments.quality.grid --root runs/quality --status                   # what is done, best LRs
    python -m experiments.quality.grid --root runs/quality-smoke --arms lora_qv_r64,msp_qv_paper --lrs 1e-3 \\
        --seeds 0 --steps 4 --micro_batch_size 4 --eval_steps 2                  # CPU smoke (2 cells)

Cells run in-process: --jobs worker processes (worker.py; on one GPU they share it, --gpus spreads them),
each training a queue of cells one after another with msplora_dist.train.trainer.Trainer(cfg).fit() on a
TrainConfig built here (cell_values), so Python, torch, DeepSpeed and the process group start once per
worker, not once per cell. A cell that fails is recorded as an error and the grid goes on.

Arms: experiments/quality/arms.py (seven; plain LoRA is MSPLoRA with ranks (0, 0, r)); --arms runs a subset,
--model names the base (a Hugging Face directory or a .gguf; default ROOT/base), so one study root per task
(task/, grid/) can share a base: `--root runs/smol/docstring --model models/smollm2`.

Protocol: every cell trains the same number of steps on the same global batches (the data order depends on
the seed only), so every arm sees the same tokens. Phase "lr": each arm at each of --lrs with seed
--search_seed, evaluated on task/dev.jsonl; the arm's learning rate is the one with the lowest final dev loss
(a diverged or failed cell counts as +inf; with --retry_errors failed cells rerun first); when an edge of
the range wins, up to --widen more rates one grid step out are searched (search_lrs). Phase "final": each arm
at its learning rate with each of --seeds, evaluated on task/test.jsonl: those are the reported numbers (test
is never used for any choice); after training, the worker generates greedily for every test row and scores
it with the task's metric (generation.py; --gen_max_new_tokens 0 skips it). Cells run lr phase first, then seed by seed over all arms, so a
grid cut short still compares every arm on the same seeds.

Each cell writes its trainer output in grid/cells/<cell>/ (adapter/, summary.json, train.log) and, last,
grid/cells/<cell>/result.json (status ok / diverged / error and the error, final and base eval loss, eval
curve, trainable parameters, tokens/s, wall time, the TrainConfig and the launch/train.py command that
reproduces the cell alone). A cell with a result.json is done; cells cut off by the
deadline leave none and rerun next time (--overwrite restarts them). --deadline_s: no cell starts that would
not finish in time (its length is estimated from finished cells, or --cell_estimate_s), and a running cell
still going at the deadline is killed with its worker.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import multiprocessing.connection
import os
import shlex
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from experiments.quality import qlib
from experiments.quality.arms import Arm, arm_dict, define_arms
from experiments.quality.worker import Worker
from msplora_dist.train.backbone import projection_features

DEFAULT_LRS = (3e-4, 1e-3, 3e-3)
DONE_STATUSES = ("ok", "diverged")


# --- cells ----------------------------------------------------------------------------------------------

@dataclass
class Protocol:
    """Everything every cell shares (recorded in grid/grid.json and each result)."""

    steps: int = 300
    micro_batch_size: int = 16
    grad_accum: int = 1
    max_seq_len: int = 512
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_steps: int = 50
    alphas: float = 16.0
    dropout: float = 0.05
    num_mid_groups: int = 3
    ds_config: str = "ds_configs/zero2.json"
    attn_implementation: str = "sdpa"
    dtype: str = "auto"
    gen_max_new_tokens: int = 128  # final cells: greedy generation of every test row, scored (0: loss only)
    gen_batch_size: int = 64


@dataclass
class Cell:
    arm: str
    phase: str  # "lr" (dev) or "final" (test)
    lr: float
    seed: int
    name: str = field(init=False)

    def __post_init__(self):
        self.name = f"{self.arm}__{self.phase}__lr{self.lr:g}__s{self.seed}"

    @property
    def eval_split(self) -> str:
        return "dev" if self.phase == "lr" else "test"


def cell_dir(grid_dir: Path, name: str) -> Path:
    return grid_dir / "cells" / name


def load_result(grid_dir: Path, name: str) -> dict | None:
    path = cell_dir(grid_dir, name) / "result.json"
    return qlib.read_json(path) if path.exists() else None


def _search_scores(grid_dir: Path, arm: str, lrs, search_seed: int) -> tuple[float | None, bool]:
    results = [load_result(grid_dir, Cell(arm, "lr", lr, search_seed).name) for lr in lrs]
    complete = all(r is not None for r in results)
    scored = [(r["final_eval_loss"], r["lr"]) for r in results
              if r is not None and r["status"] == "ok" and r["final_eval_loss"] is not None and math.isfinite(r["final_eval_loss"])]
    return (min(scored)[1] if scored and complete else None), complete


def search_lrs(grid_dir: Path, arm: str, lrs, search_seed: int, widen: int = 0) -> list[float]:
    """The learning rates searched for `arm`: `lrs`, plus up to `widen` steps past an edge that won. When the
    lowest dev loss sits at the smallest (largest) lr and the search there is complete, the next lr one grid
    ratio further out joins the search (three significant digits); this repeats until the best is inside."""
    cur = sorted(lrs)
    for _ in range(widen if len(cur) > 1 and cur[0] > 0 else 0):  # a geometric step needs positive rates
        best, complete = _search_scores(grid_dir, arm, cur, search_seed)
        if best is None or not complete:
            break
        if best == cur[0]:
            cur.insert(0, float(f"{cur[0] * cur[0] / cur[1]:.3g}"))
        elif best == cur[-1]:
            cur.append(float(f"{cur[-1] * cur[-1] / cur[-2]:.3g}"))
        else:
            break
    return cur


def best_lr(grid_dir: Path, arm: str, lrs, search_seed: int, widen: int = 0) -> tuple[float | None, bool]:
    """(the lr with the lowest final dev loss, whether the search is complete: every lr cell of search_lrs has a
    result, so the best is inside the range or `widen` steps were taken; a diverged or failed cell counts as
    +inf, and the report lists it). The lr is None until the search is complete."""
    if len(lrs) == 1:
        return lrs[0], True
    searched = search_lrs(grid_dir, arm, lrs, search_seed, widen)
    best, complete = _search_scores(grid_dir, arm, searched, search_seed)
    return (best if complete else None), complete


def planned_cells(grid_dir: Path, arms: list[Arm], lrs, seeds, search_seed: int, widen: int = 0) -> list[Cell]:
    """Every cell whose configuration is known now, in run order (lr phase, then seed by seed)."""
    cells = ([Cell(a.name, "lr", lr, search_seed) for a in arms for lr in search_lrs(grid_dir, a.name, lrs, search_seed, widen)]
             if len(lrs) > 1 else [])
    for seed in seeds:
        for a in arms:
            lr, _ = best_lr(grid_dir, a.name, lrs, search_seed, widen)
            if lr is not None:
                cells.append(Cell(a.name, "final", lr, seed))
    return cells


def is_done(result: dict | None, retry_errors: bool) -> bool:
    return result is not None and (result["status"] in DONE_STATUSES or not retry_errors)


def repo_relative(path: Path) -> str:
    """Paths inside the checkout relative to it (the workers run from the repo root), so a recorded
    configuration and command read the same on every machine."""
    path = Path(path).absolute()
    try:
        return path.relative_to(qlib.REPO).as_posix()
    except ValueError:
        return str(path)


def cell_values(cell: Cell, arm: Arm, proto: Protocol, root: Path, grid_dir: Path, model: Path | None = None) -> dict:
    """The TrainConfig fields of one cell (the rest keep their defaults); a worker trains TrainConfig(**these).
    `model` is the base (a Hugging Face directory or a .gguf file; default root/base)."""
    return dict(ds_config=proto.ds_config, model=repo_relative(model or root / "base"), data=repo_relative(root / "task" / "train.jsonl"),
                eval_data=repo_relative(root / "task" / f"{cell.eval_split}.jsonl"),
                output_dir=repo_relative(cell_dir(grid_dir, cell.name)), overwrite=True,
                ranks=tuple(arm.ranks), alphas=(proto.alphas,) * 3, dropout=(proto.dropout,) * 3,
                num_mid_groups=proto.num_mid_groups, target_modules=tuple(arm.targets), max_steps=proto.steps,
                micro_batch_size=proto.micro_batch_size, grad_accum=proto.grad_accum, lr=cell.lr,
                warmup_ratio=proto.warmup_ratio, min_lr_ratio=proto.min_lr_ratio, weight_decay=proto.weight_decay,
                max_grad_norm=proto.max_grad_norm, seed=cell.seed, max_seq_len=proto.max_seq_len, eval_steps=proto.eval_steps,
                save_steps=0, keep_last=1, log_steps=10, analyze=False, attn_implementation=proto.attn_implementation,
                dtype=proto.dtype, compile_layers="false")  # the study ran eager: its generations too


def cell_evaluation(cell: Cell, proto: Protocol, root: Path) -> dict | None:
    """What the worker measures after training a final cell: greedy generations of task/test.jsonl, scored by
    the task's metric (generation.py); None for learning-rate cells (chosen on dev loss) or without generation."""
    if cell.phase != "final" or proto.gen_max_new_tokens <= 0:
        return None
    from experiments.quality.generation import metric_of

    manifest = qlib.read_json(root / "task" / "manifest.json")
    return {"rows": repo_relative(root / "task" / "test.jsonl"), "metric": metric_of(manifest),
            "max_new_tokens": proto.gen_max_new_tokens, "batch_size": proto.gen_batch_size}


def train_command(values: dict) -> str:
    """The launch/train.py command that trains the same configuration alone, from the repository root."""
    def flag(v) -> str:
        return ",".join(map(str, v)) if isinstance(v, tuple) else str(v).lower() if isinstance(v, bool) else str(v)

    return shlex.join(["python", "launch/train.py", *(x for k, v in values.items() for x in (f"--{k}", flag(v)))])


def cell_env(slot: int, jobs: int, gpus: list[str] | None) -> dict[str, str]:
    """The environment a worker process starts with (before it imports torch or DeepSpeed)."""
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    if not _cuda_available():
        env["DS_ACCELERATOR"] = os.environ.get("DS_ACCELERATOR", "cpu")
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, jobs)))  # the jobs share the cores
    return env


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def summarize_cell(cell: Cell, arm: Arm, proto: Protocol, values: dict, outcome: dict, jobs: int, out_dir: Path) -> dict:
    """result.json of one finished cell, from the worker's outcome and the trainer's summary.json."""
    summary_path = out_dir / "summary.json"
    status = outcome["status"]
    summary = qlib.read_json(summary_path) if status == "ok" and summary_path.exists() else None
    if status == "ok" and summary is None:
        status, outcome = "error", dict(outcome, error="the trainer returned but wrote no summary.json")
    result = {"name": cell.name, "arm": arm.name, "kind": arm.kind, "phase": cell.phase, "eval_split": cell.eval_split,
              "lr": cell.lr, "seed": cell.seed, "status": status, "error": outcome.get("error"),
              "ranks": list(arm.ranks), "targets": list(arm.targets), "trainable_params": arm.params, "matched_to": arm.matched_to,
              "wall_s": outcome["wall_s"], "concurrent_jobs": jobs, "protocol": asdict(proto),
              "train_config": {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()},
              "command": train_command(values), "python_executable": sys.executable, "worker": outcome.get("worker"),
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "env": outcome.get("env")}
    if summary:
        history = summary["history"]
        evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
        tps = [h["tokens_per_s"] for h in history if "tokens_per_s" in h and h["step"] > 2]
        evaluation = outcome.get("evaluation")
        if evaluation:
            result.update(metric=evaluation["metric"], metric_mean=evaluation["metric_mean"], evaluation=evaluation)
        result.update(final_eval_loss=summary["final_eval_loss"], base_eval_loss=summary["first_eval_loss"],
                      final_train_loss=summary["final_loss"], steps=summary["steps"], global_batch=summary["global_batch"],
                      skipped_steps=summary["skipped_steps"], dtype=summary["dtype"], eval_curve=evals,
                      tokens_per_s_median=round(statistics.median(tps), 1) if tps else None,
                      peak_mem_gb=max((h.get("peak_mem_gb", 0) for h in history), default=None))
    else:
        result["final_eval_loss"] = None
        log_path = out_dir / "train.log"
        if log_path.exists():
            result["log_tail"] = log_path.read_text(errors="replace")[-3000:]
    return result


# --- the scheduler --------------------------------------------------------------------------------------

@dataclass
class Running:
    cell: Cell
    values: dict


def cell_estimate(grid_dir: Path, default: float) -> float:
    """Seconds one cell takes: the slowest of the 12 cells that finished last (with a margin), else default."""
    cells = grid_dir / "cells"
    done = [qlib.read_json(p) for p in sorted(cells.glob("*/result.json"))] if cells.exists() else []
    walls = [r["wall_s"] for r in sorted(done, key=lambda r: r.get("finished_at", "")) if r["status"] == "ok"]
    return 1.15 * max(walls[-12:]) if walls else default


class GridRun:
    """One invocation's scheduler: --jobs worker processes (worker.py), each training the cells it is handed
    in-process, one after another. It hands runnable cells to idle workers while time remains, writes each
    result as it comes back, and on the deadline or a signal kills the workers still training (their cells
    rerun next time)."""

    def __init__(self, args, arms: list[Arm], proto: Protocol, log):
        self.args, self.proto, self.log = args, proto, log
        self.arms, self.arm_by_name = arms, {a.name: a for a in arms}
        self.grid_dir = args.root / "grid"
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + args.deadline_s if args.deadline_s else None
        self.workers: dict[int, Worker] = {}  # slot -> its live worker (started when a cell needs it)
        self.running: dict[int, Running] = {}  # slot -> the cell its worker trains
        self.started: set[str] = set()
        self.counts = {"ran": 0, "ok": 0, "failed": 0, "killed": 0, "workers_started": 0}

    def pending(self, skip_started: bool = True) -> list[Cell]:
        a = self.args
        cells = planned_cells(self.grid_dir, self.arms, a.lrs, a.seeds, a.search_seed, a.widen)
        cells = [c for c in cells if (a.phase == "all" or c.phase == a.phase)
                 and (not a.only or any(fnmatch.fnmatch(c.name, pat) for pat in a.only))]
        return [c for c in cells if not (skip_started and c.name in self.started)
                and not is_done(load_result(self.grid_dir, c.name), a.retry_errors)]

    def _drop_worker(self, slot: int, kill: bool) -> None:
        worker = self.workers.pop(slot)
        worker.kill() if kill else worker.stop()

    def reap(self) -> None:
        for slot, r in list(self.running.items()):
            worker = self.workers[slot]
            outcome = worker.poll()
            if outcome is None:
                if self.deadline and time.perf_counter() > self.deadline:
                    self.log(f"deadline: killing {r.cell.name} after {time.perf_counter() - worker.busy_since:.0f} s "
                             "(it reruns next time)")
                    del self.running[slot]
                    self._drop_worker(slot, kill=True)
                    self.counts["killed"] += 1
                continue
            del self.running[slot]
            if outcome["retire"]:
                self._drop_worker(slot, kill=False)
            out_dir = cell_dir(self.grid_dir, r.cell.name)
            result = summarize_cell(r.cell, self.arm_by_name[r.cell.arm], self.proto, r.values, outcome, self.args.jobs, out_dir)
            qlib.write_json(out_dir / "result.json", result)
            self.counts["ran"] += 1
            self.counts["ok" if result["status"] == "ok" else "failed"] += 1
            loss = result.get("final_eval_loss")
            self.log(f"done {r.cell.name}: {result['status']}, {result['eval_split']} loss {loss if loss is None else round(loss, 4)}, "
                     f"{result['wall_s']:.0f} s" + (f" ({result['error'][:300]})" if result["error"] else ""))

    def start(self, cell: Cell, estimate: float) -> None:
        slot = min(s for s in range(self.args.jobs) if s not in self.running)
        if slot in self.workers and not self.workers[slot].proc.is_alive():  # ended while idle (killed from outside)
            self._drop_worker(slot, kill=True)
        if slot not in self.workers:
            self.workers[slot] = Worker(slot, cell_env(slot, self.args.jobs, self.args.gpus))
            self.counts["workers_started"] += 1
        out_dir = cell_dir(self.grid_dir, cell.name)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "result.json").unlink(missing_ok=True)  # an error being retried
        values = cell_values(cell, self.arm_by_name[cell.arm], self.proto, self.args.root, self.grid_dir, self.args.model)
        self.workers[slot].submit(values, out_dir, cell_evaluation(cell, self.proto, self.args.root))
        self.running[slot] = Running(cell, values)
        self.started.add(cell.name)
        self.log(f"start {cell.name} (slot {slot}; {len(self.running)} running; estimate {estimate:.0f} s/cell)")

    def start_more(self) -> None:
        todo = self.pending()
        if self.args.max_cells:
            todo = todo[:max(0, self.args.max_cells - self.counts["ran"] - len(self.running))]
        while todo and len(self.running) < self.args.jobs:
            estimate = cell_estimate(self.grid_dir, self.args.cell_estimate_s)
            if self.deadline and time.perf_counter() + estimate > self.deadline:
                return
            self.start(todo.pop(0), estimate)

    def run(self) -> dict:
        def stop(signum, frame):
            raise SystemExit(f"grid: signal {signum}")

        previous = signal.signal(signal.SIGTERM, stop)
        try:
            while True:
                self.reap()
                self.start_more()
                if not self.running:
                    break
                multiprocessing.connection.wait([s for slot in self.running for s in self.workers[slot].sentinels()], timeout=0.5)
        finally:
            for slot, r in list(self.running.items()):  # interrupted: end the cells we started; they rerun next time
                self.log(f"stopping {r.cell.name}")
                del self.running[slot]
                self._drop_worker(slot, kill=True)
            idle = [self.workers.pop(slot) for slot in list(self.workers)]  # each shuts its process group down
            for worker in idle:
                worker.request_stop()
            for worker in idle:
                worker.stop()
            signal.signal(signal.SIGTERM, previous)  # a caller in the same process (a test) gets its handler back
        left = self.pending(skip_started=False)  # cells killed at the deadline count as left
        c = self.counts
        c.update(pending=len(left), seconds=round(time.perf_counter() - self.t0, 1))
        self.log(f"grid: ran {c['ran']} cells ({c['ok']} ok, {c['failed']} failed, {c['killed']} killed at the deadline) "
                 f"in {c['seconds']:.0f} s with {c['workers_started']} worker process(es); {len(left)} runnable cells left")
        return c


# --- reporting helpers ----------------------------------------------------------------------------------

def grid_status(grid_dir: Path, arms: list[Arm], lrs, seeds, search_seed: int, widen: int = 0) -> list[dict]:
    rows = []
    for a in arms:
        lr, complete = best_lr(grid_dir, a.name, lrs, search_seed, widen)
        finals = [load_result(grid_dir, Cell(a.name, "final", lr, s).name) for s in seeds] if lr is not None else []
        done = [r for r in finals if r and r["status"] == "ok"]
        rows.append({"arm": a.name, "kind": a.kind, "ranks": a.ranks, "params": a.params, "lr_search_complete": complete,
                     "best_lr": lr, "final_done": len(done), "final_planned": len(seeds),
                     "searched": search_lrs(grid_dir, a.name, lrs, search_seed, widen),
                     "test_losses": [round(r["final_eval_loss"], 4) for r in done],
                     "test_metric": [round(r["metric_mean"], 4) for r in done if r.get("metric_mean") is not None]})
    return rows


def base_config(model: Path) -> dict:
    """config.json of the base: a Hugging Face directory's, or the one a GGUF file's metadata gives."""
    from msplora_dist.train.gguf import find_gguf, read_config

    gguf = find_gguf(model)
    return read_config(gguf) if gguf else qlib.read_json(Path(model) / "config.json")


def base_info(model: Path) -> tuple[dict, int]:
    config = base_config(model)
    return projection_features(config), config["num_hidden_layers"]


def base_record(model: Path) -> dict:
    """Which base the grid trained on: its path and, for a converted GGUF, the file's sha256 (gguf_source.json)."""
    record = {"path": repo_relative(model)}
    source = Path(model) / "gguf_source.json"
    if source.is_file():
        record["gguf_source"] = qlib.read_json(source)
    return record


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=qlib.DEFAULT_ROOT, help="study root (task/; writes grid/)")
    p.add_argument("--model", type=Path, default=None, help="the base: a Hugging Face directory or a .gguf file (default: ROOT/base)")
    p.add_argument("--arms", default=None, help="comma-separated arm names (default: all seven)")
    p.add_argument("--lrs", default=",".join(f"{x:g}" for x in DEFAULT_LRS), help="learning rates searched (one value: no search)")
    p.add_argument("--seeds", default="1,2,3", help="seeds of the final (reported) cells")
    p.add_argument("--search_seed", type=int, default=0, help="seed of the learning-rate search cells")
    p.add_argument("--widen", type=int, default=2, help="learning-rate steps added past an edge of --lrs that wins (search_lrs)")
    p.add_argument("--phase", default="all", choices=("all", "lr", "final"), help="run only this phase's cells")
    p.add_argument("--only", default=None, help="comma-separated glob patterns of cell names to run")
    p.add_argument("--max_cells", type=int, default=0, help="run at most this many cells (0: all)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes, each training cells one by one (on one GPU: they share it)")
    p.add_argument("--gpus", default=None, help="comma-separated GPU ids, assigned to the workers round-robin")
    p.add_argument("--deadline_s", type=float, default=0, help="start no cell that would end after this many seconds; kill at it")
    p.add_argument("--cell_estimate_s", type=float, default=90, help="a cell's length before any cell has finished")
    p.add_argument("--retry_errors", action="store_true", help="rerun cells whose result is an error")
    p.add_argument("--tol", type=float, default=0.03, help="parameter-matching tolerance")
    for f in Protocol.__dataclass_fields__.values():
        p.add_argument(f"--{f.name}", type=type(f.default), default=f.default, help=f"protocol: {f.name}")
    p.add_argument("--dry_run", action="store_true", help="print the arms and the cells that would run, then stop")
    p.add_argument("--status", action="store_true", help="print what is done and the chosen learning rates, then stop")
    args = p.parse_args(argv)
    args.lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    args.seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    args.only = [x.strip() for x in args.only.split(",") if x.strip()] if args.only else None
    args.gpus = [x.strip() for x in args.gpus.split(",") if x.strip()] if args.gpus else None
    args.model = args.model or args.root / "base"
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[grid {time.perf_counter() - t0:6.1f} s] {msg}", flush=True)

    proto = Protocol(**{k: getattr(args, k) for k in Protocol.__dataclass_fields__})
    features, num_layers = base_info(args.model)
    arms = all_arms = define_arms(features, num_layers, proto.num_mid_groups, args.tol)
    if args.arms:
        wanted = [a.strip() for a in args.arms.split(",") if a.strip()]
        unknown = sorted(set(wanted) - {a.name for a in arms})
        if unknown:
            raise SystemExit(f"error: unknown arms {unknown}; expected some of {[a.name for a in arms]}")
        arms = [a for a in arms if a.name in wanted]
    grid_dir = args.root / "grid"
    task = qlib.read_json(args.root / "task" / "manifest.json")
    # Every arm, also when this invocation runs a subset (--arms): the report reads the grid's arms from here.
    meta = {"protocol": asdict(proto), "arms": [arm_dict(a) for a in all_arms], "arms_run": [a.name for a in arms],
            "lrs": args.lrs, "seeds": args.seeds,
            "search_seed": args.search_seed, "num_layers": num_layers, "features": features,
            "widen": args.widen, "base": base_record(args.model), "task": {k: task.get(k) for k in ("task", "metric", "sha256")}}
    for a in arms:
        ref = next((b for b in arms if b.name == a.matched_to), None)
        log(f"arm {a.name:<18} {a.kind:<8} ranks {a.ranks!s:<14} on {','.join(t.removesuffix('_proj') for t in a.targets):<22} "
            f"{a.params:>10,} params" + (f" ({a.params / ref.params - 1:+.1%} vs {ref.name})" if ref else ""))
    if args.status or args.dry_run:
        for row in grid_status(grid_dir, arms, args.lrs, args.seeds, args.search_seed, args.widen):
            log(json.dumps(row))
        if args.dry_run:
            cells = [c for c in planned_cells(grid_dir, arms, args.lrs, args.seeds, args.search_seed, args.widen)
                     if not is_done(load_result(grid_dir, c.name), args.retry_errors)]
            unknown_lr = [a for a in arms if best_lr(grid_dir, a.name, args.lrs, args.search_seed, args.widen)[0] is None]
            n_final_unknown = len(unknown_lr) * len(args.seeds)
            est = cell_estimate(grid_dir, args.cell_estimate_s)
            total = len(cells) + n_final_unknown
            log(f"{len(cells)} cells runnable now, {n_final_unknown} more once their arm's lr search is done; at {est:.0f} s per cell "
                f"and {args.jobs} at once: about {qlib.fmt_duration(total * est / args.jobs)}")
            by_name = {a.name: a for a in arms}
            for c in cells:
                log(f"  {c.name}: {train_command(cell_values(c, by_name[c.arm], proto, args.root, grid_dir, args.model))}")
        return {"arms": arms}
    qlib.write_json(grid_dir / "grid.json", meta)
    counts = GridRun(args, arms, proto, log).run()
    for row in grid_status(grid_dir, arms, args.lrs, args.seeds, args.search_seed, args.widen):
        log(f"{row['arm']:<18} best lr {row['best_lr']} of {row['searched']}  final {row['final_done']}/{row['final_planned']}  "
            f"test loss {row['test_losses']}  metric {row['test_metric']}")
    return counts


if __name__ == "__main__":
    main()
