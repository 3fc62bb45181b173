"""The input forms fine-tuning users bring, on the data layer: ShareGPT rows, weighted mixes of sources in
different formats, chat-template overrides, Hub dataset names offline, and the tokenized cache."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
from transformers import AutoTokenizer

from msplora_dist.errors import ConfigError, DataError
from msplora_dist.train.config import ASSETS, DataSource, TrainConfig
from msplora_dist.train.data import IGNORE_INDEX, tokenize_row
from msplora_dist.train.flags import parse_config
from msplora_dist.train.preflight import prepare_data
from msplora_dist.train.prompts import BUILTIN_CHAT_TEMPLATES, CHATML_TEMPLATE

TINY = ASSETS / "tiny_llama"
CHAT = ASSETS / "data" / "chat.jsonl"
SHAREGPT_FROM = {"user": "human", "assistant": "gpt", "system": "system"}


@pytest.fixture
def tokenizer():
    tok = AutoTokenizer.from_pretrained(str(TINY))
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_rows(n=None):
    rows = [json.loads(line) for line in CHAT.read_text().splitlines()]
    return rows[:n] if n else rows


def as_sharegpt(row):
    return {"conversations": [{"from": SHAREGPT_FROM[m["role"]], "value": m["content"]} for m in row["messages"]]}


def config(tmp_path, *args):
    return parse_config(["--data_cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"), *args])


# --- ShareGPT --------------------------------------------------------------------------------------------

def test_sharegpt_rows_tokenize_exactly_like_the_same_chat_rows(tokenizer):
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "add 2 and 3"},
                        {"role": "assistant", "content": "5"}, {"role": "user", "content": "and 4?"},
                        {"role": "assistant", "content": "9"}]}
    chat = tokenize_row(row, "chat", tokenizer, 256, train_on_prompt=False)
    sharegpt = tokenize_row(as_sharegpt(row), "sharegpt", tokenizer, 256, train_on_prompt=False)
    assert sharegpt == chat
    assert "".join(tokenizer.decode([t for t in chat["labels"] if t != IGNORE_INDEX]).split()) == "5</s>9</s>"


@pytest.mark.parametrize(("conversations", "fragment"), [
    ([{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}],
     "conversations[1].from is 'bot'; expected one of human, gpt, system"),
    ([{"from": "human", "value": 3}], "conversations[0].value must be a string, got int"),
    ("hello", "'conversations' must be a non-empty list"),
])
def test_a_bad_sharegpt_row_names_the_file_row_and_field(tmp_path, tokenizer, conversations, fragment):
    good = as_sharegpt(chat_rows(1)[0])
    data = write_jsonl(tmp_path / "sg.jsonl", [good, good, {"conversations": conversations}])
    with pytest.raises(DataError) as err:
        prepare_data(config(tmp_path, "--data", str(data)), tokenizer)
    assert "sg.jsonl" in str(err.value) and "line 3: " in str(err.value) and fragment in str(err.value), str(err.value)
    assert not any((tmp_path / "cache").glob("*/meta.json"))  # nothing cached from a refused source


# --- weighted mixes --------------------------------------------------------------------------------------

def test_a_weighted_mix_draws_in_proportion_with_each_sources_own_loss_masks(tmp_path, tokenizer):
    # Two formats: 400 alpaca rows (parquet) and 400 ShareGPT rows (jsonl), every row distinct.
    alpaca = [{"instruction": f"Echo {i}.", "input": "", "output": f"{i} {i}"} for i in range(400)]
    import datasets

    datasets.Dataset.from_list(alpaca).to_parquet(str(tmp_path / "a.parquet"))
    base = chat_rows()
    sharegpt = [as_sharegpt({"messages": [{"role": "user", "content": f"#{i} " + base[i % len(base)]["messages"][0]["content"]},
                                          *base[i % len(base)]["messages"][1:2]]}) for i in range(400)]
    write_jsonl(tmp_path / "b.jsonl", sharegpt)
    cfg = config(tmp_path, "--data", f"{tmp_path / 'a.parquet'}:0.7,{tmp_path / 'b.jsonl'}:0.3", "--eval_fraction", "0")
    train, _ = prepare_data(cfg, tokenizer)
    n = len(train)
    share_a = sum(1 for s in train["source"] if s == 0) / n
    # first_exhausted: the mix ends when the 0.7 source runs out, after ~570 draws; 4 standard errors.
    assert n > 450 and abs(share_a - 0.7) < 4 * math.sqrt(0.7 * 0.3 / n), (n, share_a)
    # Every mixed row is its source's row, tokenized and masked as that source alone gives it.
    alone = {}
    for fmt, rows in (("alpaca", alpaca), ("sharegpt", sharegpt)):
        for r in rows:
            ex = tokenize_row(r, fmt, tokenizer, cfg.max_seq_len, False)
            alone[tuple(ex["input_ids"])] = ex["labels"]
    assert all(alone[tuple(ids)] == labels for ids, labels in zip(train["input_ids"], train["labels"], strict=True))
    assert len({tuple(ids) for ids in train["input_ids"]}) == n  # first_exhausted repeats no row


def test_unweighted_sources_are_concatenated_and_each_holds_out_its_eval_share(tmp_path, tokenizer):
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": f"doc {i}"} for i in range(20)])
    cfg = config(tmp_path, "--data", f"{text},{CHAT}", "--eval_fraction", "0.1")
    train, evals = prepare_data(cfg, tokenizer)
    n_chat = len(chat_rows())
    assert len(train) + len(evals) == 20 + n_chat
    assert sorted(set(evals["source"])) == [0, 1] and sum(1 for s in evals["source"] if s == 0) == 2


@pytest.mark.parametrize(("value", "expected"), [
    ("a.jsonl", (DataSource("a.jsonl"),)),
    ("a.jsonl:0.7,b.parquet:0.3", (DataSource("a.jsonl", 0.7), DataSource("b.parquet", 0.3))),
    ("org/name", (DataSource("org/name"),)),
    ([{"path": "org/chat", "split": "train_sft", "weight": 1}, "b.jsonl:2"],
     (DataSource("org/chat", 1.0, "train_sft"), DataSource("b.jsonl", 2.0))),
])
def test_data_specs_from_flags_and_yaml(tmp_path, value, expected):
    if isinstance(value, str):
        assert parse_config(["--data", value]).data == expected
    else:
        path = tmp_path / "c.yaml"
        import yaml

        path.write_text(yaml.safe_dump({"data": value}))
        assert parse_config(["--config", str(path)]).data == expected


@pytest.mark.parametrize(("args", "fragment"), [
    (["--data", "a.jsonl:0.7,b.jsonl"], "some sources have a weight and some not"),
    (["--data", "a.jsonl:-1"], "weight=-1.0; expected a positive number"),
    (["--eval_data", "a.jsonl:0.5"], "eval sources are concatenated whole"),
    (["--mix_strategy", "round_robin"], "mix_strategy='round_robin': expected one of first_exhausted"),
])
def test_bad_mixes_are_refused_with_the_value(args, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_config(args)


def test_the_resolved_config_round_trips_through_yaml(tmp_path):
    from msplora_dist.train.config import save_config_yaml

    cfg = parse_config(["--data", "a.jsonl:0.7,org/b:0.3", "--chat_template", "chatml"])
    save_config_yaml(cfg, tmp_path / "c.yaml")
    assert dataclasses.replace(parse_config(["--config", str(tmp_path / "c.yaml")]), config=None) == cfg


# --- chat templates --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(BUILTIN_CHAT_TEMPLATES))
def test_every_builtin_template_masks_the_assistant_turns_only(tmp_path, tokenizer, name):
    cfg = config(tmp_path, "--data", str(CHAT), "--chat_template", name, "--eval_fraction", "0")
    train, _ = prepare_data(cfg, tokenizer)
    assert tokenizer.chat_template == BUILTIN_CHAT_TEMPLATES[name]
    header = {"default": "<|user|>", "chatml": "<|im_start|>user", "llama3": "<|start_header_id|>user"}[name]
    for ids, labels in zip(train["input_ids"], train["labels"], strict=True):
        learned = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
        assert header in tokenizer.decode(ids).replace(" ", "")
        assert learned and "user" not in learned and "assistant" not in learned  # headers never take the loss


def test_a_template_file_overrides_the_tokenizers_own(tmp_path, tokenizer):
    (tmp_path / "t.jinja").write_text(CHATML_TEMPLATE)
    assert tokenizer.chat_template and tokenizer.chat_template != CHATML_TEMPLATE  # the tiny model has its own
    train, _ = prepare_data(config(tmp_path, "--data", str(CHAT), "--chat_template", str(tmp_path / "t.jinja")), tokenizer)
    assert tokenizer.decode(train[0]["input_ids"]).replace(" ", "").startswith("<s><|im_start|>user")


@pytest.mark.parametrize(("content", "fragment"), [
    (None, "is neither a file nor a built-in template; expected a Jinja file or one of default, chatml, llama3"),
    ("{% for m in messages %}{{ m['content'] ", "is not a usable Jinja chat template"),
])
def test_a_bad_template_is_a_one_line_config_error(tmp_path, tokenizer, content, fragment):
    path = tmp_path / "bad.jinja"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=fragment):
        prepare_data(config(tmp_path, "--data", str(CHAT), "--chat_template", str(path)), tokenizer)


def test_a_base_model_without_a_template_gets_the_default_one(tmp_path, tokenizer):
    tokenizer.chat_template = None
    prepare_data(config(tmp_path, "--data", str(CHAT)), tokenizer)
    assert tokenizer.chat_template == BUILTIN_CHAT_TEMPLATES["default"]


# --- Hub dataset names -----------------------------------------------------------------------------------

@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 with an empty hub cache under tmp_path, as huggingface_hub reads them at import."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_a_hub_dataset_in_the_hub_cache_loads_offline(tmp_path, tokenizer, offline_hub):
    snapshot = offline_hub / "datasets--someone--sg" / "snapshots" / ("0" * 40)
    (snapshot / "data").mkdir(parents=True)
    write_jsonl(snapshot / "data" / "train.jsonl", [as_sharegpt(r) for r in chat_rows(12)])
    (offline_hub / "datasets--someone--sg" / "refs").mkdir()
    (offline_hub / "datasets--someone--sg" / "refs" / "main").write_text("0" * 40)
    train, _ = prepare_data(config(tmp_path, "--data", "someone/sg", "--eval_fraction", "0"), tokenizer)
    assert len(train) == 12


def test_a_hub_dataset_missing_offline_is_one_line_naming_it_and_hf_hub_offline(tmp_path, tokenizer, offline_hub):
    with pytest.raises(DataError) as err:
        prepare_data(config(tmp_path, "--data", "someone/missing"), tokenizer)
    message = str(err.value)
    assert "'someone/missing'" in message and "HF_HUB_OFFLINE=1" in message and "\n" not in message, message


# --- the tokenized cache ---------------------------------------------------------------------------------

class CountingTokenizer:
    """A tokenizer that counts how often it tokenizes text (delegating everything else). Every row that is
    tokenized calls it; rendering a chat template alone (as the --chat_template check does) does not."""

    def __init__(self, inner):
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "calls", 0)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __setattr__(self, name, value):
        setattr(self.inner, name, value)

    def __len__(self):
        return len(self.inner)

    def __call__(self, *args, **kwargs):
        object.__setattr__(self, "calls", self.calls + 1)
        return self.inner(*args, **kwargs)


def copy_model(tmp_path):
    import shutil

    shutil.copytree(TINY, tmp_path / "model")
    return tmp_path / "model"


def counted_run(cfg, model_dir):
    tok = CountingTokenizer(AutoTokenizer.from_pretrained(str(model_dir)))
    train, evals = prepare_data(cfg, tok)
    return tok.calls, train, evals


def test_a_second_run_reuses_the_cache_and_a_changed_tokenizer_or_template_does_not(tmp_path):
    model = copy_model(tmp_path)
    cfg = config(tmp_path, "--data", f"{CHAT},{ASSETS / 'data' / 'instructions.jsonl'}")
    calls, train, evals = counted_run(cfg, model)
    assert calls > 0
    calls, train2, evals2 = counted_run(cfg, model)
    assert calls == 0  # not one row tokenized: both sources were mapped from the cache
    assert train2[:] == train[:] and evals2[:] == evals[:]
    # Another template: only the chat source is tokenized again.
    calls, _, _ = counted_run(TrainConfig(**{**vars(cfg), "chat_template": "chatml"}), model)
    assert calls > 0
    calls, _, _ = counted_run(TrainConfig(**{**vars(cfg), "data": cfg.data[1:], "chat_template": "chatml"}), model)
    assert calls == 0  # the alpaca source does not depend on the template
    # A changed tokenizer file (a new added token) invalidates every source.
    config_file = model / "tokenizer_config.json"
    tok_config = json.loads(config_file.read_text())
    tok_config["additional_special_tokens"] = ["<|extra|>"]
    config_file.write_text(json.dumps(tok_config))
    calls, _, _ = counted_run(TrainConfig(**{**vars(cfg), "data": cfg.data[1:]}), model)
    assert calls > 0


def test_changed_data_max_seq_len_or_train_on_prompt_misses_the_cache(tmp_path):
    model = copy_model(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"doc {i}"} for i in range(6)])
    cfg = config(tmp_path, "--data", str(data))
    assert counted_run(cfg, model)[0] > 0
    for change in ({"max_seq_len": 64}, {"train_on_prompt": True}):
        assert counted_run(TrainConfig(**{**vars(cfg), **change}), model)[0] > 0
    os.utime(data, ns=(1, 1))  # the file was edited
    assert counted_run(cfg, model)[0] > 0
    assert counted_run(cfg, model)[0] == 0
    assert counted_run(TrainConfig(**{**vars(cfg), "data_cache": False}), model)[0] > 0
