"""A model directory the preflight cannot use is one line naming the file and what was expected, checked before any
weight is loaded: config.json's fields, the weight files' completeness, the tokenizer."""

from __future__ import annotations

import json
import shutil

import pytest

from msplora_dist.errors import ConfigError
from msplora_dist.train.backbone import check_model_dir, check_safetensors_file, load_tokenizer
from msplora_dist.train.config import ASSETS, TrainConfig
from msplora_dist.train.trainer import Trainer

TINY = ASSETS / "tiny_llama"


@pytest.fixture
def model_dir(tmp_path):
    """A copy of the shipped tiny model to damage."""
    return shutil.copytree(TINY, tmp_path / "model")


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def edit_config(model_dir, edit):
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(edit(config)))


@pytest.mark.parametrize(("edit", "fragments"), [
    (lambda c: {k: v for k, v in c.items() if k != "hidden_size"}, ["has no 'hidden_size'", "expected a positive integer"]),
    (lambda c: {k: v for k, v in c.items() if k != "num_hidden_layers"}, ["has no 'num_hidden_layers'"]),
    (lambda c: c | {"num_attention_heads": 0}, ["has num_attention_heads=0; expected a positive integer"]),
    (lambda c: c | {"intermediate_size": "big"}, ["intermediate_size='big'"]),
    (lambda c: c | {"num_key_value_heads": 2.5}, ["num_key_value_heads=2.5"]),
    (lambda c: [c], ["holds a JSON list; expected a JSON object"]),
])
def test_a_config_without_the_fields_the_preflight_reads_names_the_file_and_field(model_dir, edit, fragments):
    edit_config(model_dir, edit)
    with pytest.raises(ConfigError) as err:
        check_model_dir(model_dir)
    for fragment in [str(model_dir / "config.json"), *fragments]:
        assert fragment in one_line(err)


def test_optional_config_fields_may_be_absent(model_dir):
    edit_config(model_dir, lambda c: {k: v for k, v in c.items() if k not in ("num_key_value_heads", "head_dim")})
    assert check_model_dir(model_dir)["hidden_size"] > 0


@pytest.mark.parametrize(("cut", "fragment"), [(-1, "its header describes"), (4, "header is cut short"),
                                               (None, "header is not a safetensors header")])
def test_a_truncated_or_damaged_safetensors_shard_is_named_before_loading(model_dir, cut, fragment):
    shard = model_dir / "model.safetensors"
    data = shard.read_bytes()
    if cut is None:  # the header's length kept, its JSON overwritten
        n = int.from_bytes(data[:8], "little")
        data = data[:8] + b"x" * n + data[8 + n:]
    else:
        data = data[:cut]
    shard.write_bytes(data)
    with pytest.raises(ConfigError) as err:
        check_model_dir(model_dir)
    assert str(shard) in one_line(err) and fragment in one_line(err)


def test_a_whole_safetensors_file_passes_and_one_byte_more_does_not(model_dir):
    shard = model_dir / "model.safetensors"
    check_safetensors_file(shard)
    shard.write_bytes(shard.read_bytes() + b"\0")
    with pytest.raises(ConfigError, match="its header describes"):
        check_safetensors_file(shard)


def test_a_weight_index_that_is_not_a_mapping_is_one_line(model_dir):
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    with pytest.raises(ConfigError, match="'weight_map' is a list; expected a mapping"):
        check_model_dir(model_dir)


def test_a_model_without_tokenizer_files_is_one_line_naming_them(model_dir):
    for name in ("tokenizer.json", "tokenizer.model"):
        (model_dir / name).unlink()
    with pytest.raises(ConfigError) as err:
        load_tokenizer(model_dir)
    assert "has no tokenizer (none of tokenizer.json" in one_line(err) and "sentencepiece" not in one_line(err)


def test_the_trainer_refuses_a_damaged_model_before_loading_it(model_dir, tmp_path):
    edit_config(model_dir, lambda c: {k: v for k, v in c.items() if k != "hidden_size"})
    with pytest.raises(ConfigError, match="has no 'hidden_size'"):
        Trainer(TrainConfig(model=str(model_dir), output_dir=str(tmp_path / "out"), max_steps=1))
    assert not (tmp_path / "out").exists()
