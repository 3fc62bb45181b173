"""A GGUF base (`--model file.gguf`, or a directory holding one): its config, tokenizer and weights are those of
the model it was written from, it trains through the Trainer like a Hugging Face directory, and bad GGUF input
is a one-line error. The GGUF is written here from the shipped tiny Llama (tests/gguf_utils.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from msplora_dist.cli.train import main as train_main
from msplora_dist.errors import ConfigError
from msplora_dist.train.backbone import check_model_dir, load_backbone, load_tokenizer, projection_features
from tests.gguf_utils import TINY, source_model, write_tiny_gguf

TEXT = "def add(a, b):\n    \"\"\"Return the sum.\"\"\"\n    return a + b  # héllo, wörld"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _tokenizer_ids(tokenizer, text=TEXT):
    return tokenizer(text).input_ids


@pytest.mark.parametrize("tensor_dtype", [np.float32, np.float16], ids=["F32", "F16"])
def test_a_gguf_base_gives_the_logits_of_the_weights_it_was_written_from(tmp_path, tensor_dtype):
    file = write_tiny_gguf(tmp_path / "tiny.gguf", tensor_dtype=tensor_dtype)
    model = load_backbone(file, dtype="fp32", load_in_4bit=False, ds_config=None, gradient_checkpointing=False).eval()
    reference = source_model()
    if tensor_dtype == np.float16:  # what the file holds: every matrix rounded to fp16 once
        with torch.no_grad():
            for p in reference.parameters():
                if p.dim() > 1:
                    p.copy_(p.half().float())
    ids = torch.tensor([_tokenizer_ids(load_tokenizer(TINY))])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert next(model.parameters()).dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())


def test_a_gguf_base_is_read_in_the_runs_dtype(tiny_gguf):
    model = load_backbone(tiny_gguf, dtype="bf16", load_in_4bit=False, ds_config=None, gradient_checkpointing=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # dense, what the adapters wrap


def test_the_preflight_reads_a_gguf_config_as_it_reads_config_json(tiny_gguf):
    ours, theirs = check_model_dir(tiny_gguf), json.loads((TINY / "config.json").read_text())
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "intermediate_size", "vocab_size", "tie_word_embeddings")
    assert {k: ours[k] for k in keys} == {k: theirs[k] for k in keys}
    assert np.float32(ours["rms_norm_eps"]) == np.float32(theirs["rms_norm_eps"])  # GGUF stores it as a float32
    assert projection_features(ours) == projection_features(theirs)


def test_the_gguf_tokenizer_tokenizes_as_the_source_tokenizer(tiny_gguf):
    ours, theirs = load_tokenizer(tiny_gguf), load_tokenizer(TINY)
    assert _tokenizer_ids(ours) == _tokenizer_ids(theirs)
    assert (ours.eos_token_id, ours.bos_token_id) == (theirs.eos_token_id, theirs.bos_token_id)


def test_two_ggufs_of_one_folder_never_share_a_tokenized_cache_entry(tiny_gguf, tmp_path):
    """transformers names a GGUF tokenizer after its folder; the cache key must see which file it came from, or a
    second GGUF of the same folder (same tokenizer class, size and special tokens) reuses the first one's tokens."""
    from msplora_dist.train.cache import tokenizer_fingerprint

    shutil.copy(tiny_gguf, tmp_path / "a.gguf")
    shutil.copy(tiny_gguf, tmp_path / "b.gguf")
    (tmp_path / "b.gguf").write_bytes((tmp_path / "b.gguf").read_bytes() + b"\0" * 32)  # another file, same tokenizer
    a, b = (tokenizer_fingerprint(load_tokenizer(tmp_path / name), "alpaca") for name in ("a.gguf", "b.gguf"))
    assert a["path"].endswith("a.gguf") and a["files"] and a != b


def test_a_directory_holding_one_gguf_is_that_gguf(tiny_gguf, tmp_path):
    shutil.copy(tiny_gguf, tmp_path / "model.gguf")
    ours, theirs = check_model_dir(tmp_path), check_model_dir(tiny_gguf)
    assert {k: v for k, v in ours.items() if k != "_name_or_path"} == {k: v for k, v in theirs.items() if k != "_name_or_path"}
    shutil.copy(tiny_gguf, tmp_path / "other.gguf")
    with pytest.raises(ConfigError, match=r"holds 2 \.gguf files \['model.gguf', 'other.gguf'\]; expected one"):
        check_model_dir(tmp_path)


# ------------------------------------------------------------------------------------------ bad input


def _refused(capsys, tmp_path, model, *extra):
    out = tmp_path / "out"
    before = sorted(out.rglob("*"))
    capsys.readouterr()  # what writing the GGUF printed
    code = train_main(["--model", str(model), "--output_dir", str(out), "--max_steps", "1", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert sorted(out.rglob("*")) == before  # nothing written
    return err[0]


def test_a_missing_gguf_file_is_one_line(capsys, tmp_path):
    err = _refused(capsys, tmp_path, tmp_path / "nope.gguf")
    assert "nope.gguf' does not exist or is not a file; expected a .gguf file" in err


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_gguf_file_is_one_line(capsys, tmp_path, tiny_gguf, damage):
    bad = tmp_path / "bad.gguf"
    data = tiny_gguf.read_bytes()
    bad.write_bytes(b"not a gguf file at all" * 100 if damage == "garbage" else data[:2000])
    err = _refused(capsys, tmp_path, bad)
    assert "bad.gguf' is not a readable GGUF model (" in err and "expected a complete .gguf file" in err


@pytest.mark.parametrize(("architecture", "fragment"), [
    ("gpt2", "is a 'gpt2' model; expected a LLaMA-family model_type"),
    ("no-such-arch", "is not a readable GGUF model (GGUF model with architecture no-such-arch is not supported yet.)"),
])
def test_a_gguf_of_an_unsupported_architecture_is_one_line(capsys, tmp_path, architecture, fragment):
    file = write_tiny_gguf(tmp_path / f"{architecture}.gguf", architecture=architecture)
    assert fragment in _refused(capsys, tmp_path, file)


def test_a_gguf_base_without_its_packages_names_the_extra(capsys, tmp_path, tiny_gguf, monkeypatch):
    from msplora_dist.train import gguf

    monkeypatch.setattr(gguf, "NEEDED_PACKAGES", ("gguf", "no_such_package_for_this_test"))
    err = _refused(capsys, tmp_path, tiny_gguf)
    assert "is a GGUF file, and reading it needs the no_such_package_for_this_test package(s)" in err
    assert "pip install 'msplora_dist[gguf]'" in err


def test_4bit_on_a_gguf_base_is_refused_with_the_conversion_to_run(capsys, tmp_path, tiny_gguf):
    err = _refused(capsys, tmp_path, tiny_gguf, "--load_in_4bit", "true")
    assert "--load_in_4bit with the GGUF base" in err and "python launch/convert_gguf.py --gguf" in err


def test_resuming_on_a_gguf_base_checks_the_checkpoints_model(capsys, tmp_path, tiny_gguf):
    from tests.train.test_errors import fake_checkpoint

    fake_checkpoint(tmp_path / "out", hidden=32)  # a checkpoint of a wider model than the GGUF's
    err = _refused(capsys, tmp_path, tiny_gguf, "--resume", "latest", "--ranks", "8,4,2", "--num_mid_groups", "2",
                   "--target_modules", "q_proj,v_proj")
    assert "was trained on a model with hidden_size=32; --model has hidden_size=64" in err


# ------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def world_of_one():
    """A world of one: init_distributed sets the launcher's variables when they are absent, and the process group
    is the session's (tests/conftest.py), kept for the later in-process trainer tests."""
    return


def _train(model, output_dir, ds_config):
    from msplora_dist.train.config import REPO_ROOT, TrainConfig
    from msplora_dist.train.trainer import Trainer

    cfg = TrainConfig(model=str(model), output_dir=str(output_dir), ds_config=str(REPO_ROOT / "ds_configs" / ds_config),
                      max_steps=3, micro_batch_size=4, dtype="fp32", dropout=(0.0, 0.0, 0.0), eval_steps=0, max_seq_len=96,
                      lr=5e-3, analyze=False, target_modules=("q_proj", "v_proj"))
    return Trainer(cfg).fit()


@pytest.mark.parametrize("ds_config", ["zero2.json", "zero3.json"])
def test_training_on_a_gguf_base_matches_training_on_the_model_it_was_written_from(tmp_path, tiny_gguf, world_of_one, ds_config):
    from safetensors.torch import load_file

    from msplora_dist.adapters.io import load_adapter

    on_gguf = _train(tiny_gguf, tmp_path / "gguf", ds_config)
    _train(TINY, tmp_path / "dir", ds_config)
    assert on_gguf["steps"] == 3 and all(np.isfinite(h["loss"]) for h in on_gguf["history"] if "loss" in h)
    a, b = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("gguf", "dir"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k or ".B" in k)  # it trained: B left zero
    load_adapter(source_model(), tmp_path / "gguf" / "adapter")  # the GGUF run's signature is the source model's
