"""Every example config in configs/ loads and resolves, without the Hub: its fields validate, its data sources
and chat template resolve, the DeepSpeed config of its stated launch command fills in for the model's shape,
and it states its expected memory and that command."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from msplora_dist.adapters.inject import count_params
from msplora_dist.dist.ds_config import read_ds_config, resolve_ds_config
from msplora_dist.train.backbone import projection_features
from msplora_dist.train.config import DataSource
from msplora_dist.train.flags import parse_config
from msplora_dist.train.prompts import read_chat_template
from tests.launch_utils import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
# config.json essentials of each family's model (from their Hub config.json files), keyed by config name.
SHAPES = {
    "llama2-7b-qlora": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                            intermediate_size=11008),
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336),
    "mistral-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336),
    "qwen2.5-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944),
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536),
}


def header(path: Path, key: str) -> str:
    lines = [line[2:] for line in path.read_text().splitlines() if line.startswith("# ")]
    found = [line[len(key) + 2:] for line in lines if line.startswith(f"{key}: ")]
    assert found, f"{path.name} states no '# {key}:' line"
    return found[0]


def test_every_model_family_has_a_config():
    assert {p.stem for p in CONFIGS} == set(SHAPES)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_example_config_loads_and_resolves(path):
    assert "GB" in header(path, "memory")
    command = shlex.split(header(path, "launch"))
    assert command[0] == "deepspeed" and "launch/train.py" in command
    flags = command[command.index("launch/train.py") + 1:]
    num_gpus = int(command[command.index("--num_gpus") + 1])
    cfg = parse_config(flags)  # the launch command as given: --config this file, then its flags
    assert Path(cfg.config).resolve() == path.resolve() or (REPO / cfg.config).resolve() == path.resolve()
    assert cfg.data and all(isinstance(s, DataSource) for s in cfg.data)
    for source in (*cfg.data, *cfg.eval_data):
        local = REPO / source.path
        assert local.exists() or source.path.count("/") == 1, source  # shipped data, or a Hub name
    if cfg.chat_template:
        assert read_chat_template(cfg.chat_template)
    shape = SHAPES[path.stem]
    adapter = cfg.adapter_config().with_groups(shape["num_hidden_layers"])
    features = projection_features(shape)
    assert set(adapter.target_modules) <= set(features)
    ds = resolve_ds_config(read_ds_config(REPO / cfg.ds_config), **cfg.ds_values(), world_size=num_gpus,
                           dtype=cfg.resolved_dtype(on_gpu=path.stem != "smollm2-135m"))
    assert ds["train_batch_size"] == cfg.micro_batch_size * cfg.grad_accum * num_gpus
    if path.stem == "llama2-7b-qlora":  # the paper's setting: 11.0 M trainable parameters (MSPLoRA notes)
        targeted = {t: features[t] for t in adapter.target_modules}
        assert round(count_params(adapter, shape["num_hidden_layers"], targeted).total / 1e6, 1) == 11.0
