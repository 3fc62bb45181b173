"""A checkpoint that is not what the trainer wrote is never resumed from, and saying so is one line: a malformed
manifest, a manifest missing the files every checkpoint has, a deleted optimizer shard of a real checkpoint."""

from __future__ import annotations

import json

import pytest

from msplora_dist.errors import CheckpointError
from msplora_dist.train.config import TrainConfig
from msplora_dist.train.state import find_resume_dir, verify_checkpoint
from msplora_dist.train.trainer import Trainer
from tests.train.test_faults import make_fake_checkpoint


@pytest.mark.parametrize(("manifest", "fragment"), [
    (b"{not json", "malformed manifest.json (not JSON"),
    (b"\xff\xfe{}", "malformed manifest.json (not JSON"),
    (b"[]", "expected a JSON object with a 'files' mapping"),
    (b'{"files": []}', "expected a JSON object with a 'files' mapping"),
    (b'{"files": {"trainer_state.json": 12}}', "entry 'trainer_state.json' is not {bytes, sha256}"),
    (b'{"files": {"trainer_state.json": {"bytes": 2}}}', "entry 'trainer_state.json' is not {bytes, sha256}"),
    (b'{"files": {"../x": {"bytes": 2, "sha256": "00"}}}', "entry '../x' is not a path inside the folder"),
    (b'{"files": {}}', "its manifest lists no trainer_state.json, adapter/, ds/, rng-rank0.pt"),
])
def test_a_malformed_manifest_is_a_reason_not_a_traceback(tmp_path, manifest, fragment):
    good = make_fake_checkpoint(tmp_path, 4, {})
    bad = make_fake_checkpoint(tmp_path, 8, {})
    (bad / "manifest.json").write_bytes(manifest)
    assert fragment in verify_checkpoint(bad)
    assert find_resume_dir(tmp_path, "latest") == good  # skipped, with the reason logged
    with pytest.raises(CheckpointError) as err:
        find_resume_dir(tmp_path, str(bad))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_a_manifest_missing_a_ranks_rng_state_is_refused(tmp_path):
    two_ranks = make_fake_checkpoint(tmp_path, 4, {"trainer_state.json": json.dumps({"step": 4, "world_size": 2}).encode()})
    assert verify_checkpoint(two_ranks) == "its manifest lists no rng-rank1.pt of its 2 ranks"


def config(tmp_path, **overrides) -> TrainConfig:
    values = dict(output_dir=str(tmp_path / "run"), ds_config="ds_configs/zero2.json", dtype="fp32", max_steps=2,
                  micro_batch_size=2, eval_steps=0, eval_fraction=0.0, analyze=False, max_seq_len=48)
    return TrainConfig(**(values | overrides))


def test_a_real_checkpoint_missing_its_optimizer_shard_is_refused_before_loading(tmp_path, capsys):
    trainer = Trainer(config(tmp_path))
    try:
        trainer.setup()
        trainer.history.append(trainer.step())
        checkpoint = trainer.save()
    finally:
        trainer.close()
    assert verify_checkpoint(checkpoint) is None
    shards = sorted((checkpoint / "ds").rglob("*optim_states.pt"))
    assert shards, sorted(p.name for p in (checkpoint / "ds").rglob("*"))
    shards[0].unlink()
    missing = shards[0].relative_to(checkpoint).as_posix()

    with pytest.raises(CheckpointError) as err:
        Trainer(config(tmp_path, resume=str(checkpoint)))
    assert f"{missing} is missing" in str(err.value) and "\n" not in str(err.value)
    capsys.readouterr()
    with pytest.raises(CheckpointError, match="--resume latest: no valid checkpoint"):
        Trainer(config(tmp_path, resume="latest"))
    assert f"skipping checkpoint {checkpoint}: {missing} is missing" in capsys.readouterr().out
