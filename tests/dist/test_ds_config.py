"""dist.ds_config: every "auto" filled from the training values, contradictions refused with one line."""

from __future__ import annotations

import json

import pytest

from msplora_dist.dist.ds_config import read_ds_config, resolve_ds_config
from msplora_dist.errors import ConfigError
from msplora_dist.train.config import REPO_ROOT, TrainConfig


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json", "zero3_offload.json"])
def test_shipped_ds_configs_resolve_with_no_auto_left(name):
    cfg = TrainConfig(micro_batch_size=4, grad_accum=2, lr=2e-4, max_grad_norm=0.5)
    ds = resolve_ds_config(read_ds_config(REPO_ROOT / "ds_configs" / name), **cfg.ds_values(), world_size=8, dtype="bf16",
                           largest_adapter_numel=4096 * 64)
    assert "auto" not in json.dumps(ds)
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["optimizer"]["params"]["lr"] == 2e-4 and ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True
    if ds["zero_optimization"]["stage"] == 3:
        assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 4096 * 64


def test_train_batch_size_that_contradicts_the_split_is_refused():
    raw = {"train_batch_size": 32, "zero_optimization": {"stage": 2}}
    with pytest.raises(ConfigError, match=r"train_batch_size=32 but micro_batch_size x grad_accum x world size = 4 x 1 x 2 = 8"):
        resolve_ds_config(raw, **TrainConfig(micro_batch_size=4).ds_values(), world_size=2, dtype="fp32", largest_adapter_numel=1)


def test_explicit_values_must_agree_with_the_training_config():
    raw = {"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}
    with pytest.raises(ConfigError, match=r"optimizer.params.lr=0.1 contradicts the training config, which gives 0.003"):
        resolve_ds_config(raw, **TrainConfig(lr=0.003).ds_values(), world_size=1, dtype="fp32", largest_adapter_numel=1)
    raw = {"bf16": {"enabled": True}}
    with pytest.raises(ConfigError, match=r"bf16\.enabled=True"):
        resolve_ds_config(raw, **TrainConfig().ds_values(), world_size=1, dtype="fp32", largest_adapter_numel=1)


def test_persistence_threshold_below_the_adapters_is_refused():
    raw = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    with pytest.raises(ConfigError, match=r"stage3_param_persistence_threshold=0 would partition the shared adapters .* at least 1376"):
        resolve_ds_config(raw, **TrainConfig().ds_values(), world_size=2, dtype="fp32", largest_adapter_numel=1376)


def test_fp16_and_a_scheduler_section_are_refused():
    with pytest.raises(ConfigError, match="fp16"):
        resolve_ds_config({"fp16": {"enabled": True}}, **TrainConfig().ds_values(), world_size=1, dtype="fp32", largest_adapter_numel=1)
    with pytest.raises(ConfigError, match="scheduler"):
        resolve_ds_config({"scheduler": {"type": "WarmupLR"}}, **TrainConfig().ds_values(), world_size=1, dtype="fp32",
                          largest_adapter_numel=1)


def test_ds_config_that_is_not_json_names_the_line(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{\n  "train_batch_size": 8,\n  oops\n}\n')
    with pytest.raises(ConfigError, match="line 3"):
        read_ds_config(path)
