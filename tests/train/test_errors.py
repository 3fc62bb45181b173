"""Bad input to launch/train.py: a one-line error naming the value and what was expected, exit code 2,
and nothing written (no checkpoint, no adapter). Checked before any process loads the model."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest

from msplora_dist.cli.train import main as train_main
from msplora_dist.train.config import ASSETS
from tests.launch_utils import REPO, TRAIN, subprocess_env


def run_main(capsys, tmp_path, *args):
    out = tmp_path / "out"
    code = train_main(["--output_dir", str(out), "--max_steps", "1", *args])
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


def test_auto_activation_memory_without_a_gpu(capsys, tmp_path):
    assert_refused(*run_main(capsys, tmp_path, "--activation_memory_gb", "auto"), "activation_memory_gb='auto'", "no GPU",
                   "a number of GB")


def test_contradicting_batch_sizes(capsys, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 2}}))
    assert_refused(*run_main(capsys, tmp_path, "--ds_config", str(ds), "--micro_batch_size", "4"),
                   "train_batch_size=64", "4 x 1 x 1 = 4")


def test_unwritable_output_directory(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code = train_main(["--output_dir", str(blocker / "sub"), "--max_steps", "1"])
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
    # Nothing else: datasets' own "Failed to load JSON ..." log line is silenced.
    assert [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("[20")] == \
        proc.stderr.strip().splitlines()[-1:], proc.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_resume_from_the_checkpoints_folder_itself_says_to_pass_one_of_its_steps(capsys, tmp_path):
    ckpt = fake_checkpoint(tmp_path / "out")
    code, err, _ = run_main(capsys, tmp_path, "--resume", str(ckpt.parent))
    assert code == 2 and len(err) == 1 and "it is a folder of checkpoints, not one; pass one of its step-N folders" in err[0], err


@pytest.mark.parametrize("bad", ["--micro_batch_size=0", "--ranks=1,2", "--num_mid_groups=9"])
def test_contradictory_adapter_settings(capsys, tmp_path, bad):
    assert_refused(*run_main(capsys, tmp_path, bad))


def copy_tiny_model(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(ASSETS / "tiny_llama", model)
    return model


def test_tokenizer_without_an_eos_token(capsys, tmp_path):
    model = copy_tiny_model(tmp_path)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["eos_token"] = None
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    assert_refused(*run_main(capsys, tmp_path, "--model", str(model)), "no eos token")


def test_4bit_without_a_usable_bitsandbytes(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    assert_refused(*run_main(capsys, tmp_path, "--load_in_4bit", "true"), "--load_in_4bit needs a working bitsandbytes")


def test_ds_config_that_is_not_json(capsys, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 3,}}')
    assert_refused(*run_main(capsys, tmp_path, "--ds_config", str(ds)), "is not valid JSON", "line 1")


def test_every_row_longer_than_max_seq_len(capsys, tmp_path):
    data = write_jsonl(tmp_path / "long.jsonl", [json.dumps({"instruction": "word " * 300, "input": "", "output": "x"})] * 3)
    assert_refused(*run_main(capsys, tmp_path, "--data", str(data), "--max_seq_len", "64"), "max_seq_len=64")


def test_zero_stage_0_is_refused(capsys, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    assert_refused(*run_main(capsys, tmp_path, "--ds_config", str(ds)), "stage=0", "expected 1, 2 or 3")


def fake_checkpoint(output_dir, ranks=(8, 4, 2), targets=("q_proj", "v_proj"), hidden=None, **state_fields):
    """A complete checkpoint of another run: its adapter (the real format), trainer state and placeholder files."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from msplora_dist import MSPLoRAConfig, apply_msplora, save_adapter
    from msplora_dist.utils.fileio import write_manifest

    config = AutoConfig.from_pretrained(ASSETS / "tiny_llama")
    if hidden:
        config.hidden_size, config.head_dim = hidden, hidden // config.num_attention_heads
    model = apply_msplora(AutoModelForCausalLM.from_config(config), MSPLoRAConfig(ranks=ranks, target_modules=targets, num_mid_groups=2))
    path = output_dir / "checkpoints" / "step-00000002"
    save_adapter(model, path / "adapter")
    state = {"step": 2, "world_size": 1, "history": []} | state_fields
    (path / "trainer_state.json").write_text(json.dumps(state))
    (path / "ds" / "state").mkdir(parents=True)  # placeholders: the resume is refused before they are read
    (path / "ds" / "state" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (path / "rng-rank0.pt").write_bytes(b"x")
    write_manifest(path)
    return path


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"ranks": (4, 4, 2)}, "adapter ranks=[4, 4, 2]; this run has ranks=[8, 4, 2]"),
    ({"targets": ("q_proj",)}, "adapter target_modules=['q_proj']"),
    ({"hidden": 32}, "hidden_size=32"),
    ({"config": {"micro_batch_size": 8, "grad_accum": 8}}, "global batch of 64 sequences; this run has"),
    ({"config": {"seed": 7}}, "trained with seed=7; this run has seed=0"),
    ({"num_train_examples": 12}, "trained on 12 examples; this run's data gives"),
    ({"zero_stage": 3}, "trained with zero_stage=3; this run has zero_stage=2. Resume with the same ZeRO stage (--ds_config) "
                        "(a ZeRO-3 config runs stage 2 on one rank: --single_rank_zero3 keep runs stage 3 there)"),
    ({"dtype": "bf16"}, "trained with dtype='bf16'; this run has dtype='fp32'. Resume with the same --dtype"),
])
def test_resume_from_a_checkpoint_of_another_layout_model_batch_or_data(capsys, tmp_path, kwargs, fragment):
    fake_checkpoint(tmp_path / "out", **kwargs)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*"))
    code, err, _ = run_main(capsys, tmp_path, "--resume", "latest", "--ranks", "8,4,2", "--num_mid_groups", "2",
                            "--target_modules", "q_proj,v_proj")
    assert code == 2 and len(err) == 1 and fragment in err[0], err
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*")) == before  # nothing touched


def test_an_earlier_run_is_never_overwritten_by_accident(capsys, tmp_path):
    ckpt = fake_checkpoint(tmp_path / "out")
    before = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    code, err, _ = run_main(capsys, tmp_path)
    assert code == 2 and "already holds ['checkpoints']" in err[0] and "--resume latest" in err[0]
    assert {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == before


def test_resume_and_overwrite_together_contradict(capsys, tmp_path):
    code, err, _ = run_main(capsys, tmp_path, "--resume", "latest", "--overwrite", "true")
    assert code == 2 and "contradict" in err[0]


def test_a_checkpoint_deepspeed_cannot_convert_for_another_world_size_is_a_clear_error(tmp_path):
    from msplora_dist.errors import CheckpointError
    from msplora_dist.train.state import convert_to_universal

    (tmp_path / "ds" / "state").mkdir(parents=True)  # no DeepSpeed files in it
    with pytest.raises(CheckpointError, match=r"for a different number of ranks failed .*ds_to_universal exited") as info:
        convert_to_universal(tmp_path / "ds" / "state", tmp_path / "universal" / "state")
    assert "\n" not in str(info.value) and not (tmp_path / "universal").exists()  # one line, nothing left behind


def test_an_attention_backend_whose_package_is_missing_is_refused_before_loading(capsys, tmp_path):

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    assert_refused(*run_main(capsys, tmp_path, "--attn_implementation", "flash_attention_2"),
                   "attn_implementation='flash_attention_2' needs the flash_attn package")


def test_expandable_segments_are_the_default_unless_any_allocator_variable_is_set():
    from msplora_dist.cli.train import ALLOC_CONF_VARIABLES, default_allocator_conf

    env = {}
    default_allocator_conf(env)
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    for name in ALLOC_CONF_VARIABLES:  # the user's own setting, under any of PyTorch's names, is left alone
        env = {name: "max_split_size_mb:256"}
        default_allocator_conf(env)
        assert env == {name: "max_split_size_mb:256"}


def test_a_stage_2_checkpoint_resumed_at_stage_3_names_zero2_json(capsys, tmp_path):
    # One GPU wrote it with zero3.json (stage 2 there); a run that keeps stage 3 cannot read stage 2's optimizer files.
    fake_checkpoint(tmp_path / "out", zero_stage=2)
    code, err, _ = run_main(capsys, tmp_path, "--resume", "latest", "--ranks", "8,4,2", "--num_mid_groups", "2",
                            "--target_modules", "q_proj,v_proj", "--single_rank_zero3", "keep")
    assert code == 2 and len(err) == 1, err
    assert "trained with zero_stage=2; this run has zero_stage=3" in err[0] and "--ds_config ds_configs/zero2.json" in err[0]
