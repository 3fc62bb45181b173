"""Bad input to launch/train.py: a one-line error naming the value and what was expected, exit code 2,
and nothing written (no checkpoint, no adapter). Checked before any process loads the model."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from msplora_dist.train_config import ASSETS
from tests.launch_utils import REPO, TRAIN, subprocess_env

_spec = importlib.util.spec_from_file_location("train_script", TRAIN)
train_script = importlib.util.module_from_spec(_spec)
sys.modules["train_script"] = train_script  # dataclasses look their module up there
_spec.loader.exec_module(train_script)


def run_main(capsys, tmp_path, *args):
    out = tmp_path / "out"
    code = train_script.main(["--output_dir", str(out), "--max_steps", "1", *args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err, out


def assert_refused(code, err, out, *fragments):
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in err[0], err[0]
    assert not (out / "checkpoints").exists() and not (out / "adapter").exists()


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_jsonl_line_is_named(capsys, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ['{"text": "fine"}', '{"text": "fine"}', '{"text": "broken'])
    assert_refused(*run_main(capsys, tmp_path, "--data", str(data)), "line 3", "d.jsonl")


def test_rows_missing_the_expected_fields(capsys, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"prompt": "p", "completion": "c"})] * 4)
    assert_refused(*run_main(capsys, tmp_path, "--data", str(data)), "['completion', 'prompt']", "instruction, output")


def test_empty_data_set(capsys, tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    assert_refused(*run_main(capsys, tmp_path, "--data", str(data)), "empty.jsonl")


def test_model_directory_that_is_not_llama_family(capsys, tmp_path):
    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (model / "model.safetensors").write_bytes(b"")
    assert_refused(*run_main(capsys, tmp_path, "--model", str(model)), "'gpt2'", "llama")


def test_model_directory_missing_its_weights(capsys, tmp_path):
    model = tmp_path / "noweights"
    model.mkdir()
    (model / "config.json").write_text((ASSETS / "tiny_llama" / "config.json").read_text())
    assert_refused(*run_main(capsys, tmp_path, "--model", str(model)), "has no weights")


def test_contradicting_batch_sizes(capsys, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 2}}))
    assert_refused(*run_main(capsys, tmp_path, "--ds_config", str(ds), "--micro_batch_size", "4"),
                   "train_batch_size=64", "4 x 1 x 1 = 4")


def test_unwritable_output_directory(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code = train_script.main(["--output_dir", str(blocker / "sub"), "--max_steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not writable" in err[0] and str(blocker / "sub") in err[0]


def test_unknown_target_module(capsys, tmp_path):
    assert_refused(*run_main(capsys, tmp_path, "--target_modules", "q_proj,qkv_proj"), "qkv_proj")


def test_resume_with_no_checkpoint(capsys, tmp_path):
    assert_refused(*run_main(capsys, tmp_path, "--resume", "latest"), "no valid checkpoint")


def test_real_script_prints_one_line_and_no_traceback(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ['{"text": "fine"}', "not json"])
    proc = subprocess.run([sys.executable, str(TRAIN), "--data", str(data), "--output_dir", str(tmp_path / "out")],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "line 2" in proc.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize("bad", ["--micro_batch_size=0", "--ranks=1,2", "--num_mid_groups=9"])
def test_contradictory_adapter_settings(capsys, tmp_path, bad):
    assert_refused(*run_main(capsys, tmp_path, bad))
