"""The rank side of stopping on request: a signal is only recorded, and the death of a launcher counts as a SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import time

import psutil
import torch

from msplora_dist.dist.signals import LauncherWatch, StopRequest, _is_launcher, stop_agreed


def test_launchers_are_told_from_other_parents_by_their_command_line():
    assert _is_launcher(["/usr/bin/python3", "-u", "-m", "deepspeed.launcher.launch", "--world_info=x"])
    assert _is_launcher(["/venv/bin/python", "/venv/bin/deepspeed", "launch/train.py"])
    assert _is_launcher(["torchrun", "--nproc_per_node", "2", "train.py"])
    assert not _is_launcher(["python", "-m", "pytest", "tests/deepspeed_things.py"])
    assert not _is_launcher(["bash"])


def test_a_dead_launcher_becomes_a_stop_request_and_a_signal_is_only_recorded():
    request = StopRequest()
    request.install()
    try:
        assert stop_agreed(request, torch.device("cpu")) == 0
        launcher = subprocess.Popen(["sleep", "60"])
        watch = LauncherWatch(request, interval_s=0.05)
        watch.watched = [psutil.Process(launcher.pid)]
        watch._thread.start()  # not start(): that would also set this test process's parent-death signal
        time.sleep(0.2)
        assert request.signum == 0
        launcher.kill()  # left a zombie (not reaped): still dead to the watch
        deadline = time.monotonic() + 10
        while not request.signum and time.monotonic() < deadline:
            time.sleep(0.05)
        assert request.signum == signal.SIGTERM and stop_agreed(request, torch.device("cpu")) == signal.SIGTERM
        launcher.wait()
    finally:
        request.uninstall()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
