"""launch/convert_gguf.py: a GGUF becomes a plain Hugging Face directory with the same logits and tokenizer,
written atomically; bad input is one line and writes nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from msplora_dist.cli.convert_gguf import main
from msplora_dist.train.backbone import check_model_dir, load_backbone, load_tokenizer
from msplora_dist.utils.fileio import sha256_file
from tests.gguf_utils import TINY, source_model, write_tiny_gguf
from tests.launch_utils import REPO, subprocess_env

TEXT = "def add(a, b):\n    return a + b  # héllo"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_converted_directory_has_the_gguf_models_logits_and_tokenizer(capsys, tmp_path, tiny_gguf, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "converted"
    assert main(["--gguf", str(tiny_gguf), "--out", str(out), "--dtype", dtype]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    record = json.loads((out / "gguf_source.json").read_text())
    assert printed["sha256"] == record["sha256"] == sha256_file(tiny_gguf) and record["dtype"] == dtype

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # a plain directory: 4-bit loading, export and generate accept it
    check_model_dir(out)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    converted = AutoModelForCausalLM.from_pretrained(out)
    assert {p.dtype for p in converted.parameters()} == {torch_dtype}
    from_gguf = load_backbone(tiny_gguf, dtype=dtype, load_in_4bit=False, ds_config=None, gradient_checkpointing=False)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tokenizer(TEXT).input_ids])
    assert tokenizer(TEXT).input_ids == load_tokenizer(TINY)(TEXT).input_ids
    assert torch.equal(_logits(converted, ids), _logits(from_gguf, ids))
    if dtype == "fp32":  # and, F32 tensors in the file, the logits of the weights the GGUF was written from
        assert torch.equal(_logits(converted, ids), _logits(source_model(), ids))


def test_converting_again_replaces_an_earlier_conversion_but_not_another_directory(capsys, tmp_path, tiny_gguf):
    out = tmp_path / "converted"
    assert main(["--gguf", str(tiny_gguf), "--out", str(out), "--dtype", "fp32"]) == 0
    assert main(["--gguf", str(tiny_gguf), "--out", str(out)]) == 0  # an earlier conversion: replaced
    assert json.loads((out / "gguf_source.json").read_text())["dtype"] == "bf16"
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    capsys.readouterr()
    assert main(["--gguf", str(tiny_gguf), "--out", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no earlier conversion (gguf_source.json)" in err[0] and "--overwrite" in err[0]
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(("make", "fragment"), [
    (lambda tmp, good: tmp / "missing.gguf", "missing.gguf' does not exist or is not a file"),
    (lambda tmp, good: tmp, "is neither a .gguf file nor a directory holding one"),
    (lambda tmp, good: (tmp / "bad.gguf").write_bytes(good.read_bytes()[:3000]) and tmp / "bad.gguf",
     "bad.gguf' is not a readable GGUF model"),
])
def test_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, tiny_gguf, make, fragment):
    source = tmp_path / "in"
    source.mkdir()
    out = tmp_path / "out"
    assert main(["--gguf", str(make(source, tiny_gguf)), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --gguf ") and fragment in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_the_launch_script_is_the_cli(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "convert_gguf.py"), "--gguf", str(tmp_path / "x.gguf"),
                           "--out", str(tmp_path / "out")], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: --gguf {str(tmp_path / 'x.gguf')!r} does not exist or is not a file; expected a .gguf file"]


def test_export_refuses_a_gguf_base_with_the_conversion_to_run_and_takes_the_converted_directory(capsys, tmp_path, tiny_gguf):
    from msplora_dist import MSPLoRAConfig, apply_msplora, save_adapter
    from msplora_dist.cli.export import main as export_main

    adapter = tmp_path / "adapter"
    save_adapter(apply_msplora(source_model(), MSPLoRAConfig(ranks=(4, 2, 2), target_modules=("q_proj", "v_proj"))), adapter)
    capsys.readouterr()
    assert export_main(["--adapter", str(adapter), "--format", "merged", "--base", str(tiny_gguf), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a GGUF model; convert it once (python launch/convert_gguf.py --gguf" in err[0], err
    assert main(["--gguf", str(tiny_gguf), "--out", str(tmp_path / "converted"), "--dtype", "fp32"]) == 0
    assert export_main(["--adapter", str(adapter), "--format", "merged", "--base", str(tmp_path / "converted"),
                        "--out", str(tmp_path / "m")]) == 0
