"""TrainConfig: YAML + flags, typed and validated, with the value named in every refusal."""

from __future__ import annotations

import re

import pytest

from msplora_dist.errors import ConfigError
from msplora_dist.train.config import TrainConfig
from msplora_dist.train.flags import build_parser, parse_config


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("lr: 0.001\nranks: [16, 8, 4]\nmicro_batch_size: 2\ntarget_modules: [q_proj, v_proj]\n")
    cfg = parse_config(["--config", str(yaml_file), "--micro_batch_size", "3", "--dropout", "0", "--load_in_4bit", "true"])
    assert cfg.lr == 0.001 and cfg.ranks == (16, 8, 4) and cfg.micro_batch_size == 3
    assert cfg.target_modules == ("q_proj", "v_proj") and cfg.dropout == (0.0, 0.0, 0.0) and cfg.load_in_4bit is True
    assert cfg.grad_accum == TrainConfig().grad_accum


def test_comma_separated_flags_become_tuples():
    cfg = parse_config(["--ranks", "64,32,16", "--alphas", "16", "--target_modules", "q_proj,v_proj"])
    assert cfg.ranks == (64, 32, 16) and cfg.alphas == (16.0, 16.0, 16.0) and cfg.target_modules == ("q_proj", "v_proj")


def test_launcher_local_rank_flag_is_accepted():
    assert parse_config(["--local_rank=1"]).seed == 0


@pytest.mark.parametrize(("argv", "message"), [
    (["--micro_batch_size", "0"], "micro_batch_size=0"),
    (["--lr", "-1"], "lr=-1.0"),
    (["--dtype", "fp16"], "dtype='fp16'"),
    (["--ranks", "8,-1,2"], "mid rank is -1"),
    (["--max_steps", "0"], "max_steps=0"),
    (["--micro_batch_size", "two"], "micro_batch_size='two'"),
    (["--load_in_4bit", "maybe"], "load_in_4bit='maybe'"),
    (["--log_steps", "0"], "log_steps=0: expected an integer >= 1"),
    (["--weight_decay", "-0.1"], "weight_decay=-0.1: expected a finite number >= 0"),
    (["--weight_decay", "nan"], "weight_decay=nan"),
    (["--max_grad_norm", "nan"], "max_grad_norm=nan: expected a finite number >= 0"),
    (["--attn_implementation", "foo"], "attn_implementation='foo': expected one of eager, sdpa"),
    (["--lr", "1e6"], "lr=1000000.0: expected at most 1.0"),
    (["--seed", "-1"], "seed=-1: expected an integer 0 <= seed < 2**32"),
    (["--seed", str(2**64)], f"seed={2**64}: expected"),
    (["--output_dir", ""], "output_dir='': expected a directory"),
    (["--activation_memory_gb", "0"], "activation_memory_gb='0': expected a positive number of GB up to 1e6, or auto"),
    (["--activation_memory_gb", "1e10"], "activation_memory_gb='1e10': expected a positive number of GB up to 1e6, or auto"),
    (["--activation_memory_gb", "-8"], "activation_memory_gb='-8': expected a positive number"),
    (["--activation_memory_gb", "lots"], "activation_memory_gb='lots': expected a positive number"),
    (["--activation_memory_gb", "inf"], "activation_memory_gb='inf': expected a positive number"),
])
def test_bad_values_name_the_field_and_value(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(argv)


def test_activation_memory_takes_gigabytes_or_auto_from_flags_yaml_and_python(tmp_path):
    assert parse_config([]).activation_memory_gb is None
    assert parse_config(["--activation_memory_gb", "auto"]).activation_memory_gb == "auto"
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("activation_memory_gb: 24\n")
    assert parse_config(["--config", str(yaml_file)]).activation_memory_gb == "24"
    assert TrainConfig(activation_memory_gb=0.5).activation_memory_gb == "0.5"
    with pytest.raises(ConfigError, match="activation_memory_gb=True: expected"):
        TrainConfig(activation_memory_gb=True)


def test_unknown_yaml_field_is_refused(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown fields \['learning_rate'\]"):
        parse_config(["--config", str(yaml_file)])


def test_every_field_has_help_text():
    helps = {a.dest: a.help for a in build_parser()._actions if a.dest not in ("help", "local_rank")}
    assert all(h and not h.startswith(" (default") for h in helps.values()), [k for k, h in helps.items() if not h]


def test_help_is_grouped_shows_booleans_and_keeps_defaults_whole(monkeypatch):
    import dataclasses

    monkeypatch.setenv("COLUMNS", "80")  # a narrow terminal: long defaults must wrap whole, not mid-word

    from msplora_dist.train.config import HELP_GROUPS, TrainConfig

    missing = [f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("group") not in HELP_GROUPS]
    assert not missing, f"fields without a --help group (grouped(...) in TrainConfig): {missing}"
    text = build_parser().format_help()
    positions = [text.index(f"\n{title}:\n") for title in HELP_GROUPS.values()]
    assert positions == sorted(positions), "the sections appear in HELP_GROUPS order"
    assert "deepspeed launch/train.py" in text.split("options:")[0]
    assert "--load_in_4bit {true,false}" in text and "(default: false)" in text and "--ranks A,B,C" in text
    # Defaults are wrapped between words only: the shipped paths appear whole, relative to the repository.
    assert " msplora_dist/assets/tiny_llama)" in text.replace("\n", " ")
    assert all(not line.rstrip().endswith(("/", "_", "-")) for line in text.splitlines()), "a word was broken"
    assert "msplora_dist/assets/data/instructions.jsonl)" in text and "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj" in text


@pytest.mark.parametrize(("argv", "message"), [
    (["--lrr", "1e-3"], "unknown flag --lrr; did you mean --lr?"),
    (["--micro_batchsize", "2"], "unknown flag --micro_batchsize; did you mean --micro_batch_size?"),
    (["--gradient_accum=4"], "unknown flag --gradient_accum; did you mean --grad_accum?"),
    (["--zzzzzz", "1"], "unknown flag --zzzzzz (see --help)"),
    (["--lr"], "argument --lr: expected one argument (see --help)"),
])
def test_a_bad_flag_is_one_line_with_the_closest_flag_not_the_usage_block(argv, message, capsys):
    with pytest.raises(ConfigError) as err:
        parse_config(argv)
    assert str(err.value) == message
    assert capsys.readouterr().err == ""  # argparse printed no usage block


def test_a_misspelt_yaml_field_names_the_closest_one(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("warmup_ratoi: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown fields \['warmup_ratoi'\].*; did you mean warmup_ratio\?"):
        parse_config(["--config", str(yaml_file)])
