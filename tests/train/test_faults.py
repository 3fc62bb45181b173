"""Faults: a killed rank, a kill during a checkpoint write, non-finite steps. Nothing lost, nothing
hangs, and the run can always continue from its last complete checkpoint."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from msplora_dist.errors import CheckpointError
from msplora_dist.train.state import find_resume_dir, verify_checkpoint
from msplora_dist.utils.fileio import write_manifest
from tests.launch_utils import REPO, TRAIN, adapter_tensors, free_port, run_train, subprocess_env, summary

pytestmark = pytest.mark.slow

ARGS = ["--ds_config", "ds_configs/zero3.json", "--micro_batch_size", "4", "--dtype", "fp32", "--dropout", "0",
        "--eval_steps", "0", "--max_seq_len", "128", "--lr", "5e-3", "--analyze", "false"]


def wait_for(path, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"training ended (rc {proc.returncode}) before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.02)


def test_killed_rank_ends_the_launcher_and_resume_reaches_the_uninterrupted_adapter(tmp_path):
    args = [*ARGS, "--max_steps", "24", "--save_steps", "4", "--keep_last", "10"]
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           str(TRAIN), "--output_dir", str(killed), *args]
    launcher = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(killed / "checkpoints" / "step-00000004", launcher)
        ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "--local_rank=1" in " ".join(p.cmdline())]
        assert len(ranks) == 1
        killed_at = time.monotonic()
        os.kill(ranks[0].pid, signal.SIGKILL)
        launcher.wait(timeout=60)  # no hang: the launcher notices and ends the other rank
        assert time.monotonic() - killed_at < 60
    finally:
        if launcher.poll() is None:
            launcher.kill()
            pytest.fail("the launcher did not exit after a rank was killed")
    assert launcher.returncode != 0
    complete = [p.name for p in (killed / "checkpoints").iterdir() if verify_checkpoint(p) is None]
    assert "step-00000004" in complete and "step-00000024" not in complete
    assert not (killed / "adapter").exists()

    run_train(killed, *args, "--resume", "latest", nproc=2)
    straight = tmp_path / "straight"
    run_train(straight, *args, nproc=2)
    assert summary(killed)["steps"] == summary(straight)["steps"] == 24
    a, b = adapter_tensors(killed), adapter_tensors(straight)
    assert all((a[k] == b[k]).all() for k in b), "resumed run differs from the uninterrupted one"


def test_sigterm_to_the_launcher_stops_every_rank_after_a_checkpoint_and_none_outlives_it(tmp_path):
    # DeepSpeed's runner dies on SIGTERM without forwarding it; the ranks notice (LauncherWatch), stop at the same
    # step boundary, write a checkpoint and exit 143, and DeepSpeed's per-node launcher then ends too.
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           str(TRAIN), "--output_dir", str(out), *ARGS, "--max_steps", "400"]
    launcher = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(out / "train_config.yaml", launcher)  # written once the engine is built: the ranks watch their launchers
        tree = psutil.Process(launcher.pid).children(recursive=True)
        assert sum("--local_rank" in " ".join(p.cmdline()) for p in tree) == 2
        launcher.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(tree, timeout=120)
        assert not alive, f"{[p.cmdline() for p in alive]} outlived the launcher"
        output = launcher.communicate(timeout=30)[0]
    finally:
        for p in psutil.Process().children(recursive=True):
            p.kill()
    stopped = re.search(r"stopped by SIGTERM after step (\d+)/400; checkpoint (\S+): continue with --resume latest", output)
    assert stopped, output[-3000:]
    step = int(stopped.group(1))
    assert 0 < step < 400 and stopped.group(2).endswith(f"step-{step:08d}")
    assert find_resume_dir(out, "latest").name == f"step-{step:08d}"
    assert "Traceback" not in output


def test_nonfinite_steps_are_skipped_and_too_many_in_a_row_stop_with_a_checkpoint(tmp_path):
    out = tmp_path / "nan"
    env_steps = "3,5,6"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           str(TRAIN), "--output_dir", str(out), *ARGS, "--max_steps", "10", "--max_nonfinite_steps", "2"]
    env = subprocess_env() | {"MSPLORA_INJECT_NAN_AT_STEPS": env_steps}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "2 steps in a row had a non-finite loss or gradient (steps 5-6)" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    last = find_resume_dir(out, "latest")
    assert last.name == "step-00000006"
    state = json.loads((last / "trainer_state.json").read_text())
    skipped = [h["step"] for h in state["history"] if h.get("skipped")]
    assert skipped == [3, 5, 6]
    # Step 4 trained normally after the single bad step 3.
    step4 = state["history"][3]
    assert step4["step"] == 4 and not step4.get("skipped") and math.isfinite(step4["loss"])
    # The checkpoint holds the last good adapters: finite, and the run resumes from it.
    from safetensors.torch import load_file

    weights = load_file(last / "adapter" / "adapter_model.safetensors")
    assert all(t.isfinite().all() for t in weights.values())
    run_train(out, *ARGS, "--max_steps", "10", "--max_nonfinite_steps", "2", "--resume", "latest", nproc=2)
    assert summary(out)["steps"] == 10 and summary(out)["skipped_steps"] == 3


def make_fake_checkpoint(root, step, files):
    """A folder with the files every checkpoint has (placeholders) and `files`, and its manifest."""
    path = root / "checkpoints" / f"step-{step:08d}"
    path.mkdir(parents=True)
    placeholders = {"trainer_state.json": json.dumps({"step": step, "world_size": 1}).encode(),
                    "adapter/adapter_config.json": b"{}", "ds/state/mp_rank_00_model_states.pt": b"x", "rng-rank0.pt": b"x"}
    for name, data in {**placeholders, **files}.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    write_manifest(path)
    return path


def test_a_partial_or_corrupt_checkpoint_is_never_taken_for_the_latest(tmp_path):
    good = make_fake_checkpoint(tmp_path, 4, {"adapter/x.bin": b"a" * 100})
    # A kill during the next write leaves: the temporary folder (never a step-* name) ...
    (tmp_path / "checkpoints" / ".tmp-step-00000008").mkdir()
    (tmp_path / "checkpoints" / ".tmp-step-00000008" / "trainer_state.json").write_text("{}")
    assert find_resume_dir(tmp_path, "latest") == good
    # ... a renamed folder whose manifest was never written ...
    no_manifest = make_fake_checkpoint(tmp_path, 8, {})
    (no_manifest / "manifest.json").unlink()
    assert find_resume_dir(tmp_path, "latest") == good
    # ... or a file cut short or changed after the manifest was written.
    truncated = make_fake_checkpoint(tmp_path, 12, {"adapter/x.bin": b"b" * 100})
    (truncated / "adapter" / "x.bin").write_bytes(b"b" * 50)
    changed = make_fake_checkpoint(tmp_path, 16, {"adapter/x.bin": b"c" * 100})
    (changed / "adapter" / "x.bin").write_bytes(b"d" * 100)
    assert "does not match its checksum" in verify_checkpoint(changed)
    assert find_resume_dir(tmp_path, "latest") == good
    with pytest.raises(CheckpointError, match=r"step-00000016.*does not match"):
        find_resume_dir(tmp_path, str(changed))
    shutil.rmtree(good)
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        find_resume_dir(tmp_path, "latest")
