"""Stopping a run on request: SIGTERM (a scheduler's preemption), SIGINT (Ctrl-C), or the death of the launcher.

A signal only records the request; the trainer checks it at each step boundary, collectively (stop_agreed), so every
rank stops after the same step, writes the same checkpoint and exits. DeepSpeed's launcher does not forward signals
to the ranks: `deepspeed` (launcher/runner.py) dies on SIGTERM and leaves its per-node launcher (launcher/launch.py)
and the ranks running; launch.py itself forwards SIGTERM but kills the ranks 30 s later. So each rank also watches
its launchers (LauncherWatch) and treats the death of any of them as a SIGTERM: a rank never outlives its launcher.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading

import psutil
import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
LAUNCHER_MODULES = ("deepspeed.launcher.launch", "deepspeed.launcher.runner", "torch.distributed.run")
LAUNCHER_SCRIPTS = ("deepspeed", "torchrun")


class StopRequest:
    """Records the first stop signal; a second one of the same kind ends the process at once (no checkpoint)."""

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Take SIGTERM and SIGINT (main thread only, as Python requires; a no-op elsewhere)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum:
            os._exit(128 + signum)  # asked twice: stop now; the last complete checkpoint stays the latest
        self.signum = signum
        from msplora_dist.utils.log import log

        log(f"{signal.Signals(signum).name} received: stopping after the current step with a checkpoint "
            "(send it again to stop at once, without one)")

    def request(self, signum: int = signal.SIGTERM) -> None:
        """The same as receiving `signum` (LauncherWatch calls it from its thread)."""
        if not self.signum:
            self._handle(signum, None)


def stop_agreed(request: StopRequest, device: torch.device) -> int:
    """Collective: the signal any rank received (0: none), the same on every rank."""
    flag = torch.tensor([request.signum], dtype=torch.int64, device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def _is_launcher(argv: list[str]) -> bool:
    """`python -m deepspeed.launcher.launch ...`, `deepspeed ...` (the console script, run by python), torchrun."""
    modules = {argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-m"}
    scripts = {os.path.basename(a) for a in argv[:2]}
    return bool(modules & set(LAUNCHER_MODULES) or scripts & set(LAUNCHER_SCRIPTS))


def _launchers() -> list[psutil.Process]:
    """The chain of launcher processes above this one (DeepSpeed's per-node launcher, its runner, torchrun)."""
    chain, proc = [], psutil.Process()
    with contextlib.suppress(psutil.Error):
        while (proc := proc.parent()) is not None:
            if not _is_launcher(proc.cmdline()):
                break
            chain.append(proc)
    return chain


def _alive(proc: psutil.Process) -> bool:
    """is_running() also checks the pid was not reused; a zombie (dead, not yet reaped by its parent) is dead."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class LauncherWatch:
    """A daemon thread that turns the death of any launcher above this rank into request(SIGTERM). Also asks the
    kernel for a SIGTERM when the direct parent dies (prctl PR_SET_PDEATHSIG), which needs no polling."""

    def __init__(self, request: StopRequest, interval_s: float = 1.0):
        self.request, self.interval_s = request, interval_s
        self.watched = _launchers()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="launcher-watch", daemon=True)

    def start(self) -> LauncherWatch:
        if self.watched:
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if any(not _alive(p) for p in self.watched):
                self.request.request(signal.SIGTERM)
                return

    def stop(self) -> None:
        self._stop.set()
