"""The DeepSpeed config the trainer resolves: fp32 engine for the adapters whatever --dtype, the backbone's dtype
only for ZeRO-3's zero.Init, no setting that lets a non-finite gradient through, and no backbone tensor made
persistent unless the config asks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from msplora_dist.dist.ds_config import (
    SINGLE_RANK_ZERO3,
    backbone_init_config,
    demoted_zero3,
    read_ds_config,
    resolve_ds_config,
    single_rank_zero3_note,
)
from msplora_dist.errors import ConfigError
from msplora_dist.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
VALUES = dict(micro_batch_size=2, grad_accum=1, world_size=1, lr=1e-3, weight_decay=0.0, max_grad_norm=1.0)


def resolve(raw: dict, dtype: str = "bf16", **values) -> dict:
    return resolve_ds_config(raw, **(VALUES | values), dtype=dtype)


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
def test_the_engine_runs_in_fp32_and_zero3_builds_the_backbone_in_the_run_dtype(name):
    raw = read_ds_config(REPO / "ds_configs" / f"{name}.json")
    ds = resolve(raw, "bf16")
    # DeepSpeed's bf16 mode would cast the adapters (its only trainable tensors) to bf16.
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert backbone_init_config(ds, "bf16")["bf16"]["enabled"] is True
    assert backbone_init_config(ds, "fp32")["bf16"]["enabled"] is False
    assert ds["bf16"]["enabled"] is False  # backbone_init_config copies


def test_an_explicit_bf16_setting_must_still_agree_with_dtype():
    with pytest.raises(ConfigError, match=r"bf16\.enabled=True contradicts"):
        resolve({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}, "fp32")
    assert resolve({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}, "bf16")["bf16"]["enabled"] is False


def test_turning_off_the_bf16_overflow_check_is_refused():
    with pytest.raises(ConfigError, match="check_grad_overflow=false"):
        resolve({"bf16": {"enabled": "auto", "check_grad_overflow": False}, "zero_optimization": {"stage": 2}})


def test_a_misspelt_zero_section_is_refused_instead_of_training_without_it():
    with pytest.raises(ConfigError, match="'zero_optimisation' but no 'zero_optimization'"):
        resolve({"zero_optimisation": {"stage": 3}})


def test_zero3_persists_no_backbone_tensor_unless_the_config_sets_a_threshold():
    ds = resolve({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": "auto"}}, world_size=2)
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    # An explicit value is DeepSpeed's own rule for the backbone; the adapters persist regardless, so even a
    # value below the largest adapter (refused before) is fine.
    ds = resolve({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 7}}, world_size=2)
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 7


def test_an_nvme_offload_without_its_folder_is_refused(tmp_path):
    zero = {"stage": 3, "offload_param": {"device": "nvme"}}
    with pytest.raises(ConfigError, match=r"offload_param\.nvme_path=None"):
        resolve({"zero_optimization": zero})
    zero["offload_param"]["nvme_path"] = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="expected an existing folder"):
        resolve({"zero_optimization": zero})
    zero["offload_param"]["nvme_path"] = str(tmp_path)
    assert resolve({"zero_optimization": zero})["zero_optimization"]["offload_param"]["nvme_path"] == str(tmp_path)


def test_a_data_types_section_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="data_types"):
        resolve({"zero_optimization": {"stage": 2}, "data_types": {"grad_accum_dtype": "bf16"}})


def test_a_ds_config_that_is_a_list_is_one_line(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps([{"zero_optimization": {"stage": 2}}]))
    with pytest.raises(ConfigError, match="expected a JSON object"):
        read_ds_config(path)


def test_train_batch_size_that_contradicts_the_split_is_refused():
    raw = {"train_batch_size": 32, "zero_optimization": {"stage": 2}}
    with pytest.raises(ConfigError, match=r"train_batch_size=32 but micro_batch_size x grad_accum x world size = 4 x 1 x 2 = 8"):
        resolve_ds_config(raw, **TrainConfig(micro_batch_size=4).ds_values(), world_size=2, dtype="fp32")


def test_explicit_values_must_agree_with_the_training_config():
    raw = {"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}
    with pytest.raises(ConfigError, match=r"optimizer.params.lr=0.1 contradicts the training config, which gives 0.003"):
        resolve_ds_config(raw, **TrainConfig(lr=0.003).ds_values(), world_size=1, dtype="fp32")
    raw = {"bf16": {"enabled": True}}
    with pytest.raises(ConfigError, match=r"bf16\.enabled=True"):
        resolve_ds_config(raw, **TrainConfig().ds_values(), world_size=1, dtype="fp32")


def test_fp16_and_a_scheduler_section_are_refused():
    with pytest.raises(ConfigError, match="fp16"):
        resolve_ds_config({"fp16": {"enabled": True}}, **TrainConfig().ds_values(), world_size=1, dtype="fp32")
    with pytest.raises(ConfigError, match="scheduler"):
        resolve_ds_config({"scheduler": {"type": "WarmupLR"}}, **TrainConfig().ds_values(), world_size=1, dtype="fp32")


def test_ds_config_that_is_not_json_names_the_line(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{\n  "train_batch_size": 8,\n  oops\n}\n')
    with pytest.raises(ConfigError, match="line 3"):
        read_ds_config(path)


def zero3(world_size: int, **zero) -> dict:
    """The resolved zero section of a ZeRO-3 config that stays at stage 3 on one rank (--single_rank_zero3 keep)."""
    return resolve_ds_config({"zero_optimization": {"stage": 3, **zero}}, **(VALUES | {"world_size": world_size}),
                             single_rank_zero3="keep",
                             dtype="bf16")["zero_optimization"]


def test_zero3_on_one_rank_skips_the_host_work_that_partitions_nothing_there():
    # One rank, parameters on the GPU: a gathered weight is a view of its only (whole) shard.
    assert {k: zero3(1)[k] for k in SINGLE_RANK_ZERO3} == SINGLE_RANK_ZERO3
    assert zero3(1, stage3_max_reuse_distance="auto")["stage3_max_reuse_distance"] == SINGLE_RANK_ZERO3["stage3_max_reuse_distance"]
    # Several ranks, or parameters offloaded (a gather copies onto the GPU, a release frees it): DeepSpeed's own.
    for zero in (zero3(2, stage3_max_reuse_distance="auto"), zero3(1, offload_param={"device": "cpu"})):
        assert not set(SINGLE_RANK_ZERO3) & set(zero), zero
    # An explicit value is the user's.
    explicit = zero3(1, memory_efficient_linear=True, stage3_max_reuse_distance=7)
    assert explicit["memory_efficient_linear"] is True and explicit["stage3_max_reuse_distance"] == 7


def test_the_one_rank_note_says_what_the_resolved_config_does():
    ours = single_rank_zero3_note({"zero_optimization": zero3(1)})
    assert "memory_efficient_linear off" in ours and "unbounded" in ours and "config's own" not in ours
    kept = single_rank_zero3_note({"zero_optimization": zero3(1, memory_efficient_linear=True)})
    assert "config's own memory_efficient_linear kept" in kept and "unbounded" in kept and " off" not in kept
    assert "offload (cpu)" in single_rank_zero3_note({"zero_optimization": zero3(1, offload_param={"device": "cpu"})})


def test_a_zero3_config_on_one_rank_runs_stage_2_unless_kept_or_offloading_parameters():
    shipped = read_ds_config(REPO / "ds_configs" / "zero3.json")
    one = resolve(shipped)
    # Stage 2 with the shared keys; no stage-3 key is left (one left at "auto" would be refused).
    assert one["zero_optimization"] == {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                                        "reduce_bucket_size": 10_000_000}
    assert demoted_zero3(shipped, one) and not demoted_zero3(read_ds_config(REPO / "ds_configs" / "zero2.json"), one)
    # A bare ZeRO-3 section keeps ZeRO-3's memory as stage 2: overlap_comm on (DeepSpeed's stage-3 default only) and the
    # one-rank bucket (stage 3's default is one 5e8 bucket, stage 2's two).
    assert resolve({"zero_optimization": {"stage": 3}})["zero_optimization"] == {
        "stage": 2, "overlap_comm": True, "reduce_bucket_size": 10_000_000}
    assert resolve({"zero_optimization": {"stage": 3, "overlap_comm": False}})["zero_optimization"]["overlap_comm"] is False
    # Stage 3 stays: asked to, several ranks, parameters offloaded, or an optimizer offload only stage 3 has.
    for kept in (resolve(shipped, single_rank_zero3="keep"), resolve(shipped, world_size=2, micro_batch_size=1),
                 resolve(read_ds_config(REPO / "ds_configs" / "zero3_offload.json")),
                 resolve({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 0.5}}}),
                 resolve({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": str(REPO)}}})):
        assert kept["zero_optimization"]["stage"] == 3 and not demoted_zero3(shipped, kept)
    with pytest.raises(ConfigError, match="single_rank_zero3='stage2': expected one of as_zero2, keep"):
        resolve(shipped, single_rank_zero3="stage2")
    with pytest.raises(ConfigError, match="single_rank_zero3='off': expected one of as_zero2, keep"):
        TrainConfig(single_rank_zero3="off")
    note = single_rank_zero3_note(one, demoted=True)
    assert "uses DeepSpeed's stage 2" in note and "--single_rank_zero3 keep" in note


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
def test_the_gradient_bucket_is_smaller_on_one_rank_where_it_only_stages_copies(name):
    # ZeRO allocates reduce_bucket_size whole (twice with overlap_comm, in fp32 here): 5e7 is 0.37 GiB on one GPU, where
    # the all-reduce is over one rank. "auto" gives 1e7 there and 5e7 with several ranks; absent, DeepSpeed's own default.
    raw = read_ds_config(REPO / "ds_configs" / f"{name}.json")
    assert raw["zero_optimization"]["reduce_bucket_size"] == "auto"
    assert resolve(raw)["zero_optimization"]["reduce_bucket_size"] == 10_000_000
    assert resolve(raw, world_size=2, micro_batch_size=1)["zero_optimization"]["reduce_bucket_size"] == 50_000_000
    assert "reduce_bucket_size" not in resolve({"zero_optimization": {"stage": 2}})["zero_optimization"]
