"""The adapter directory: bit-exact round trips, the file layout, mismatch and corruption errors, atomic saves."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch

import msplora_dist.adapters.io as ckpt
from msplora_dist import (
    CheckpointError,
    ConfigError,
    MSPLoRAConfig,
    MSPLoRALinear,
    adapter_params,
    apply_msplora,
    get_hierarchy,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from msplora_dist.adapters.io import CONFIG_NAME, WEIGHTS_NAME

TARGETS = ("q_proj", "k_proj", "v_proj")


def _config(**kw) -> MSPLoRAConfig:
    values = dict(ranks=(4, 3, 2), alphas=(8, 6, 4), num_mid_groups=2, target_modules=TARGETS, dropout=(0.1, 0.0, 0.05))
    values.update(kw)
    return MSPLoRAConfig(**values)


@pytest.fixture
def saved(tmp_path, make_model, randomize_adapters):
    """(model, adapter dir): a 5-layer Llama with random adapters, saved."""
    model = apply_msplora(make_model(num_layers=5), _config())
    randomize_adapters(model, seed=3)
    return model, save_adapter(model, tmp_path / "adapter")


def _header(path) -> tuple[int, dict]:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return n, json.loads(fh.read(n))


def _assert_same_adapters(a, b):
    pa, pb = adapter_params(a), adapter_params(b)
    assert sorted(pa) == sorted(pb)
    for k in pa:
        assert pa[k].dtype == pb[k].dtype and torch.equal(pa[k], pb[k]), k


# ---------------------------------------------------------------- round trips and layout


def test_round_trip_into_a_fresh_model_is_bit_exact(saved, make_model, input_ids):
    model, path = saved
    fresh = make_model(num_layers=5)
    loaded = load_adapter(fresh, path)
    assert loaded is fresh
    _assert_same_adapters(model, loaded)
    assert get_hierarchy(loaded).config == get_hierarchy(model).config
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids).logits, model(input_ids=input_ids).logits)


def test_round_trip_into_a_model_with_adapters_already_applied_is_bit_exact(saved, make_model, randomize_adapters):
    model, path = saved
    other = apply_msplora(make_model(num_layers=5), _config())
    randomize_adapters(other, seed=99)
    load_adapter(other, path)
    _assert_same_adapters(model, other)
    # loading copies values into the existing tensors: the sharing is unchanged
    h = get_hierarchy(other)
    for m in other.modules():
        if isinstance(m, MSPLoRALinear):
            assert m.pairs[0] is getattr(h, "global")[m.target]


def test_file_holds_each_unique_tensor_once_plus_the_header(saved):
    model, path = saved
    weights = path / WEIGHTS_NAME
    header_len, header = _header(weights)
    params = adapter_params(model)
    unique_bytes = sum(p.numel() * p.element_size() for p in params.values())
    assert os.path.getsize(weights) == 8 + header_len + unique_bytes
    assert set(header) - {"__metadata__"} == set(params)


def test_keys_are_exactly_level_group_layer_target_and_a_rank0_level_has_none(tmp_path, make_model, randomize_adapters):
    model = apply_msplora(make_model(num_layers=3), _config(ranks=(4, 0, 2), num_mid_groups=2))
    randomize_adapters(model)
    path = save_adapter(model, tmp_path / "a")
    _, header = _header(path / WEIGHTS_NAME)
    expected = {f"global.{t}.{ab}" for t in TARGETS for ab in ("lora_A", "lora_B")}
    expected |= {f"layer.{layer}.{t}.{ab}" for layer in range(3) for t in TARGETS for ab in ("lora_A", "lora_B")}
    assert set(header) - {"__metadata__"} == expected
    assert header["global.k_proj.lora_A"]["shape"] == [4, 32] and header["global.k_proj.lora_B"]["shape"] == [16, 4]
    assert header["layer.2.q_proj.lora_B"]["dtype"] == "F32"
    fresh = load_adapter(make_model(num_layers=3), path)
    _assert_same_adapters(model, fresh)
    assert len(get_hierarchy(fresh).mid) == 0


def test_config_json_holds_format_ranks_alphas_dropout_groups_targets_layers_signature(saved):
    _, path = saved
    meta = json.loads((path / CONFIG_NAME).read_text())
    for key in ("format_version", "ranks", "alphas", "dropout", "use_rslora", "num_mid_groups", "groups", "target_modules",
                "num_layers", "signature"):
        assert key in meta, key
    assert meta["format_version"] == ckpt.FORMAT_VERSION
    assert meta["ranks"] == [4, 3, 2] and meta["alphas"] == [8.0, 6.0, 4.0] and meta["dropout"] == [0.1, 0.0, 0.05]
    assert meta["num_mid_groups"] == 2 and meta["groups"] == [[0, 3], [3, 5]] and meta["target_modules"] == list(TARGETS)
    assert meta["num_layers"] == 5 and meta["use_rslora"] is False
    assert meta["signature"]["model_type"] == "llama" and meta["signature"]["hidden_size"] == 32
    assert meta["signature"]["features"]["k_proj"] == [32, 16]
    config, meta2 = read_adapter_config(path)
    assert config.groups == ((0, 3), (3, 5)) and meta2 == meta


def test_saving_again_replaces_the_directory(saved, randomize_adapters, make_model):
    model, path = saved
    randomize_adapters(model, seed=7)
    save_adapter(model, path)
    _assert_same_adapters(model, load_adapter(make_model(num_layers=5), path))
    assert [p.name for p in path.parent.iterdir()] == ["adapter"]


# ---------------------------------------------------------------- mismatches


def _assert_untouched(model):
    assert get_hierarchy(model, required=False) is None
    assert not any(isinstance(m, MSPLoRALinear) for m in model.modules())


def test_loading_onto_another_hidden_size_raises_checkpoint_error_naming_it(saved, make_model):
    _, path = saved
    other = make_model(num_layers=5, hidden_size=48, intermediate_size=64)
    with pytest.raises(CheckpointError, match=r"hidden_size=32.*hidden_size=48"):
        load_adapter(other, path)
    _assert_untouched(other)


def test_loading_onto_another_number_of_layers_raises_checkpoint_error_naming_it(saved, make_model):
    _, path = saved
    other = make_model(num_layers=4)
    with pytest.raises(CheckpointError, match=r"num_layers=5.*num_layers=4"):
        load_adapter(other, path)
    _assert_untouched(other)


def test_loading_onto_another_model_type_raises_checkpoint_error_naming_it(saved, make_model):
    _, path = saved
    other = make_model("mistral", num_layers=5)
    with pytest.raises(CheckpointError, match=r"model_type='llama'.*model_type='mistral'"):
        load_adapter(other, path)
    _assert_untouched(other)


@pytest.mark.parametrize("kw, key", [(dict(ranks=(4, 3, 3)), "ranks"), (dict(target_modules=("q_proj", "v_proj")), "target_modules"),
                                     (dict(num_mid_groups=3), "groups"), (dict(alphas=(8, 6, 5)), "alphas")])
def test_loading_onto_adapters_with_another_layout_raises_checkpoint_error_naming_it(saved, make_model, kw, key):
    _, path = saved
    other = apply_msplora(make_model(num_layers=5), _config(**kw))
    before = {k: v.clone() for k, v in adapter_params(other).items()}
    with pytest.raises(CheckpointError, match=f"has {key}=.*the model's adapters have {key}="):
        load_adapter(other, path)
    assert all(torch.equal(before[k], v) for k, v in adapter_params(other).items())


# ---------------------------------------------------------------- damaged directories


def test_missing_directory_raises_checkpoint_error(tmp_path, tiny_llama):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_adapter(tiny_llama, tmp_path / "nope")


def test_missing_config_file_raises_checkpoint_error(saved, make_model):
    _, path = saved
    (path / CONFIG_NAME).unlink()
    with pytest.raises(CheckpointError, match=f"{CONFIG_NAME}' is missing"):
        load_adapter(make_model(num_layers=5), path)


def test_missing_weights_file_raises_checkpoint_error(saved, make_model):
    _, path = saved
    (path / WEIGHTS_NAME).unlink()
    other = make_model(num_layers=5)
    with pytest.raises(CheckpointError, match=f"{WEIGHTS_NAME}' is missing"):
        load_adapter(other, path)
    _assert_untouched(other)


def _flip(path, offset, n=4):
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_the_weights_raise_checkpoint_error(saved, make_model):
    _, path = saved
    _flip(path / WEIGHTS_NAME, os.path.getsize(path / WEIGHTS_NAME) - 16)
    other = make_model(num_layers=5)
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        load_adapter(other, path)
    _assert_untouched(other)


@pytest.mark.parametrize("where", ["header", "length", "truncated"])
def test_corrupt_safetensors_without_a_recorded_hash_raise_checkpoint_error(saved, make_model, where):
    _, path = saved
    meta = json.loads((path / CONFIG_NAME).read_text())
    del meta["weights_sha256"]
    (path / CONFIG_NAME).write_text(json.dumps(meta))
    weights = path / WEIGHTS_NAME
    if where == "header":
        _flip(weights, 8 + 2, n=6)
    elif where == "length":
        _flip(weights, 3, n=1)
    else:
        weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_adapter(make_model(num_layers=5), path)


def test_invalid_json_raises_checkpoint_error(saved, make_model):
    _, path = saved
    (path / CONFIG_NAME).write_text('{"format_version": 1, "ranks": [4, 3')
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        load_adapter(make_model(num_layers=5), path)


@pytest.mark.parametrize("edit, match", [(lambda m: m.update(format_version=2), "format_version 2; expected 1"),
                                         (lambda m: m.pop("signature"), r"lacks \['signature'\]"),
                                         (lambda m: m.update(ranks=[4, -1, 2]), "the mid rank is -1")])
def test_bad_config_values_raise_clear_errors(saved, make_model, edit, match):
    _, path = saved
    meta = json.loads((path / CONFIG_NAME).read_text())
    edit(meta)
    (path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises((CheckpointError, ConfigError), match=match):
        load_adapter(make_model(num_layers=5), path)


# ---------------------------------------------------------------- atomic saves


def _snapshot(path):
    return {p.name: p.read_bytes() for p in path.iterdir()}


def test_a_failure_inside_the_write_leaves_the_previous_adapter_intact(saved, monkeypatch, randomize_adapters, make_model):
    model, path = saved
    before = _snapshot(path)
    real_save_file = ckpt.save_file

    def failing_save_file(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)  # a complete new weights file ...
        raise OSError(28, "No space left on device")  # ... then the write fails

    monkeypatch.setattr(ckpt, "save_file", failing_save_file)
    randomize_adapters(model, seed=42)
    with pytest.raises(OSError, match="No space left"):
        save_adapter(model, path)
    assert _snapshot(path) == before
    assert [p.name for p in path.parent.iterdir()] == ["adapter"], "no temporary directory may be left behind"


def test_a_failure_at_the_final_rename_leaves_the_previous_adapter_intact(saved, monkeypatch, randomize_adapters):
    model, path = saved
    before = _snapshot(path)
    real_replace = os.replace
    calls = []

    def failing_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the first moves the old adapter aside, the second would install the new one
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", failing_replace)
    randomize_adapters(model, seed=42)
    with pytest.raises(OSError, match="Input/output error"):
        save_adapter(model, path)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert _snapshot(path) == before
    assert [p.name for p in path.parent.iterdir()] == ["adapter"]


def test_saving_a_model_without_adapters_raises_config_error(tmp_path, tiny_llama):
    with pytest.raises(ConfigError, match="has no MSPLoRA adapters"):
        save_adapter(tiny_llama, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_saving_the_same_adapter_again_gives_the_same_bytes(saved, tmp_path):
    # safetensors writes its metadata map in a hash order that changes from save to save: with more than one
    # entry, some of a dozen saves in a row differ, and so would two identical runs. weights_sha256.
    model, path = saved
    digests = set()
    for i in range(12):
        ckpt.save_adapter(model, tmp_path / f"again{i}")
        digests.add(json.loads((tmp_path / f"again{i}" / CONFIG_NAME).read_text())["weights_sha256"])
    assert digests == {json.loads((path / CONFIG_NAME).read_text())["weights_sha256"]}
