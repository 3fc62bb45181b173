"""A stop signal ends the run at the next step boundary with a checkpoint and exit code 128 + signal; a checkpoint
write that fails on a full disk says so in one line, leaves no partial folder, and the previous checkpoint stays the
latest. In process, one rank, the output on a 1.1 MB tmpfs (or, where mounting is not allowed, an injected ENOSPC)."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess

import pytest

from msplora_dist.errors import WriteFailed
from msplora_dist.train import state
from msplora_dist.train.config import TrainConfig
from msplora_dist.train.state import find_resume_dir, list_checkpoints
from msplora_dist.train.trainer import Trainer, TrainingInterrupted

MOUNT = "mount"



@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """A folder on a tmpfs that holds one checkpoint of the tiny run (680 kB) but not two; without the right to
    mount one, a folder whose checkpoint manifests fail to write with ENOSPC from the second on."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = shutil.which(MOUNT) is not None and subprocess.run(
        [MOUNT, "-t", "tmpfs", "-o", "size=1100k", "tmpfs", str(mount)], capture_output=True).returncode == 0
    if not mounted:
        writes = []

        def fail_from_the_second(directory):
            writes.append(directory)
            if len(writes) > 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "manifest.json"))
            return real(directory)

        real = state.write_manifest
        monkeypatch.setattr(state, "write_manifest", fail_from_the_second)
    yield mount
    if mounted:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_signal_stops_at_the_step_boundary_with_a_checkpoint_and_a_full_disk_keeps_the_previous_one(small_disk):
    out = small_disk / "run"
    cfg = TrainConfig(output_dir=str(out), ds_config="ds_configs/zero2.json", dtype="fp32", max_steps=6, micro_batch_size=2,
                      eval_steps=0, eval_fraction=0.0, analyze=False, max_seq_len=48, keep_last=2)
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler's preemption would; the handler only records it
        with pytest.raises(TrainingInterrupted) as stopped:
            trainer.train()
        assert stopped.value.exit_code == 128 + signal.SIGTERM
        assert str(stopped.value) == (f"stopped by SIGTERM after step 1/6; checkpoint {out}/checkpoints/step-00000001: "
                                      "continue with --resume latest")
        assert trainer.step_count == 1 and find_resume_dir(out, "latest").name == "step-00000001"

        trainer.history.append(trainer.step())
        with pytest.raises(WriteFailed) as failed:
            trainer.save()
        message = str(failed.value)
        assert "\n" not in message and "No space left on device" in message
        assert f"writing checkpoint {out}/checkpoints/step-00000002 failed" in message
        assert message.endswith(f"the latest checkpoint is {out}/checkpoints/step-00000001")
        assert failed.value.exit_code == 4
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001"]  # no .tmp-step-00000002 left
        assert [p.name for p in list_checkpoints(out)] == ["step-00000001"]
        assert find_resume_dir(out, "latest").name == "step-00000001"
    finally:
        trainer.close()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # close() gives the signals back
