"""A few training steps through the Trainer, in-process, on each new input form: ShareGPT rows, a weighted mix
of two files in different formats, a chat-template override, and a Hub-name model resolved offline from a
Hugging Face cache the test lays out."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from msplora_dist.errors import ConfigError
from msplora_dist.train.config import ASSETS
from msplora_dist.train.flags import parse_config
from msplora_dist.train.trainer import Trainer

DATA = ASSETS / "data"
FAST = ["--max_steps", "2", "--micro_batch_size", "4", "--eval_steps", "0", "--analyze", "false", "--max_seq_len", "96",
        "--ds_config", "ds_configs/zero2.json", "--dropout", "0", "--seed", "1"]


def train(tmp_path, *args) -> Trainer:
    cfg = parse_config(["--output_dir", str(tmp_path / "out"), "--data_cache_dir", str(tmp_path / "cache"), *FAST, *args])
    trainer = Trainer(cfg)
    summary = trainer.fit()
    assert summary["steps"] == 2 and all(math.isfinite(h["loss"]) for h in summary["history"] if "loss" in h)
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    return trainer


def sharegpt_file(tmp_path):
    speakers = {"user": "human", "assistant": "gpt", "system": "system"}
    rows = [json.loads(line) for line in (DATA / "chat.jsonl").read_text().splitlines()]
    path = tmp_path / "sharegpt.jsonl"
    path.write_text("".join(json.dumps({"conversations": [{"from": speakers[m["role"]], "value": m["content"]}
                                                          for m in r["messages"]]}) + "\n" for r in rows))
    return path


def test_trains_on_sharegpt_rows(tmp_path):
    train(tmp_path, "--data", str(sharegpt_file(tmp_path)))


def test_trains_on_a_weighted_mix_of_a_parquet_and_a_jsonl_source(tmp_path):
    import datasets

    datasets.load_dataset("json", data_files=str(DATA / "text.jsonl"), split="train").to_parquet(str(tmp_path / "t.parquet"))
    train(tmp_path, "--data", f"{tmp_path / 't.parquet'}:0.4,{sharegpt_file(tmp_path)}:0.6")


def test_trains_with_a_chat_template_file(tmp_path):
    from msplora_dist.train.prompts import CHATML_TEMPLATE

    (tmp_path / "chatml.jinja").write_text(CHATML_TEMPLATE)
    train(tmp_path, "--data", str(DATA / "chat.jsonl"), "--chat_template", str(tmp_path / "chatml.jinja"))


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE under tmp_path, holding the tiny model as the Hub cache lays it out
    (blobs, a snapshot of links to them, refs/main). huggingface_hub reads both variables at import, so the
    test sets its constants."""
    from huggingface_hub import constants

    repo, commit = tmp_path / "hub" / "models--someone--tiny-llama", "1" * 40
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / commit).mkdir(parents=True)
    for i, f in enumerate(sorted(ASSETS.joinpath("tiny_llama").iterdir())):
        shutil.copy(f, repo / "blobs" / f"blob{i}")
        (repo / "snapshots" / commit / f.name).symlink_to(f"../../blobs/blob{i}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return repo / "snapshots" / commit


def test_trains_a_hub_name_model_from_the_cache_offline(tmp_path, offline_hub):
    assert train(tmp_path, "--model", "someone/tiny-llama").plan.model_dir == offline_hub


def test_a_hub_name_model_missing_offline_is_one_line_naming_it_and_hf_hub_offline(tmp_path, offline_hub):
    with pytest.raises(ConfigError) as err:
        Trainer(parse_config(["--model", "someone/absent", "--output_dir", str(tmp_path / "out")]))
    message = str(err.value)
    assert "'someone/absent'" in message and "HF_HUB_OFFLINE=1" in message and "\n" not in message, message
    assert not (tmp_path / "out" / "adapter").exists()
