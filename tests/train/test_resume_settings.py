"""The learning-rate schedule counts training steps, skipped (non-finite) ones included, and a resume applies this
run's lr, warmup, min lr and weight decay (saying which changed) while refusing a changed gradient clipping, which
DeepSpeed's ZeRO-1/2 would silently take from the checkpoint. In process, one rank."""

from __future__ import annotations

import pytest

from msplora_dist.errors import CheckpointError
from msplora_dist.train.config import TrainConfig
from msplora_dist.train.schedule import warmup_cosine
from msplora_dist.train.trainer import Trainer


def config(tmp_path, **overrides) -> TrainConfig:
    values = dict(output_dir=str(tmp_path / "run"), ds_config="ds_configs/zero2.json", dtype="fp32", max_steps=4,
                  micro_batch_size=2, eval_steps=0, eval_fraction=0.0, analyze=False, max_seq_len=48, warmup_ratio=0.25,
                  min_lr_ratio=0.1, lr=5e-3, weight_decay=0.0)
    return TrainConfig(**(values | overrides))


def test_skipped_steps_advance_the_schedule_and_a_resume_honours_changed_optimisation_flags(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MSPLORA_INJECT_NAN_AT_STEPS", "2")
    first = Trainer(config(tmp_path))
    try:
        first.setup()
        records = [first.step() for _ in range(2)]
        first.history += records
        assert records[1].get("skipped") and not records[0].get("skipped")
        assert [r["lr"] for r in records] == pytest.approx([5e-3 * warmup_cosine(k, 4, 1, 0.1) for k in (0, 1)])
        # The skipped step 2 moved the schedule on: step 3 gets the multiplier of step index 2.
        assert first.scheduler.get_last_lr()[0] == pytest.approx(5e-3 * warmup_cosine(2, 4, 1, 0.1))
        first.save()
    finally:
        first.close()
    monkeypatch.delenv("MSPLORA_INJECT_NAN_AT_STEPS")

    with pytest.raises(CheckpointError, match=r"max_grad_norm=1\.0; this run has max_grad_norm=0\.5"):
        Trainer(config(tmp_path, resume="latest", max_grad_norm=0.5))

    capsys.readouterr()
    resumed = Trainer(config(tmp_path, resume="latest", lr=1e-3, min_lr_ratio=0.5, weight_decay=0.1))
    try:
        resumed.setup()
        out = capsys.readouterr().out
        assert "lr 0.005 -> 0.001, min_lr_ratio 0.1 -> 0.5, weight_decay 0 -> 0.1 apply from step 3" in out
        records = [resumed.step() for _ in range(2)]
        # The checkpoint's base lr (5e-3) and weight decay do not win over the new flags.
        assert [r["lr"] for r in records] == pytest.approx([1e-3 * warmup_cosine(k, 4, 1, 0.5) for k in (2, 3)])
        groups = resumed.scheduler.optimizer.param_groups
        assert {g["weight_decay"] for g in groups} == {0.1}
        assert {g["initial_lr"] for g in groups} == {1e-3}
    finally:
        resumed.close()
