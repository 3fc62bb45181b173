"""Rows the trainer would otherwise take quietly or name unhelpfully: chat turns that do not alternate, rows of empty
strings, a bad row's line in its file (before any hold-out, shuffle or mix), and a huge row tokenized only as far as
max_seq_len needs."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from msplora_dist.errors import DataError
from msplora_dist.train import data
from msplora_dist.train.config import ASSETS, TrainConfig
from msplora_dist.train.data import tokenize_dataset, tokenize_row
from msplora_dist.train.rows import load_rows
from msplora_dist.train.trainer import Trainer


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(ASSETS / "tiny_llama"))


def turns(*roles):
    return [{"role": r, "content": f"{r} says {i}"} for i, r in enumerate(roles)]


GOOD_CHAT = {"messages": turns("user", "assistant")}


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize(("row", "fragment"), [
    ({"messages": turns("user", "user", "assistant")}, "messages[1] is a second user turn in a row; expected user and "
                                                       "assistant turns to alternate"),
    ({"messages": turns("user", "assistant", "assistant")}, "messages[2] is a second assistant turn in a row"),
    ({"messages": turns("user", "system", "assistant")}, "messages[1] is a system turn after the first"),
    ({"messages": turns("system", "system", "user", "assistant")}, "messages[1] is a system turn after the first"),
    ({"messages": turns("user", "tool", "assistant")}, "messages[1] has role 'tool'; expected system (first), user or assistant"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"}]},
     "conversations[1] is a second user turn in a row"),
])
def test_chat_turns_that_do_not_alternate_name_the_file_line_and_turn(tokenizer, tmp_path, row, fragment):
    good = GOOD_CHAT if "messages" in row else {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    path = write_lines(tmp_path / "chat.jsonl", [json.dumps(good), "", json.dumps(row), json.dumps(good)])
    fmt = "chat" if "messages" in row else "sharegpt"
    with pytest.raises(DataError) as err:
        tokenize_dataset(load_rows(path), fmt, tokenizer, 128, False, str(path), file=path)
    assert str(err.value) == f"data {str(path)!r}: line 3: {fragment}" or str(err.value).startswith(
        f"data {str(path)!r}: line 3: {fragment}")


@pytest.mark.parametrize("roles", [("system", "user", "assistant", "user", "assistant"), ("assistant", "user", "assistant"),
                                   ("system", "assistant"), ("user", "assistant", "user")])
def test_alternating_turns_with_an_optional_leading_system_turn_are_taken(tokenizer, roles):
    assert tokenize_row({"messages": turns(*roles)}, "chat", tokenizer, 256, False)["input_ids"]


@pytest.mark.parametrize(("fmt", "empty", "full"), [
    ("alpaca", {"instruction": "", "input": "", "output": ""}, {"instruction": "Add 2 and 3.", "input": "", "output": "5"}),
    ("alpaca", {"instruction": " ", "output": "\n"}, {"instruction": "Add 2 and 3.", "output": "5"}),
    ("text", {"text": ""}, {"text": "Some text."}),
    ("chat", {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]}, GOOD_CHAT),
])
def test_rows_of_empty_strings_are_dropped_and_counted_apart(tokenizer, tmp_path, fmt, empty, full):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(full), json.dumps(empty), json.dumps(full)])
    split = tokenize_dataset(load_rows(path), fmt, tokenizer, 128, False, str(path), file=path)
    assert (split.num_rows, split.num_empty, split.num_dropped, len(split.dataset)) == (3, 1, 0, 2)
    # An empty row kept would teach the model to answer an empty prompt with eos: it has no example to give.
    assert tokenize_row(empty, fmt, tokenizer, 128, False)["num_loss_tokens"] == 0


def test_a_source_of_only_empty_rows_is_refused(tokenizer, tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": ""})] * 3)
    with pytest.raises(DataError, match=r"all of its 3 rows are empty \(every field an empty string\)"):
        tokenize_dataset(load_rows(path), "text", tokenizer, 128, False, str(path), file=path)


def test_a_bad_row_is_named_by_its_line_in_its_file_not_its_place_after_the_mix(tmp_path):
    rows = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(40)]
    lines = [json.dumps(r) for r in rows]
    lines[30] = json.dumps({"instruction": None, "input": "", "output": "x"})
    lines[10:10] = ["", "   "]  # blank lines, which datasets skips: the bad row is on line 33, and is row 31
    bad = write_lines(tmp_path / "bad.jsonl", lines)
    other = write_lines(tmp_path / "other.jsonl", [json.dumps(r) for r in rows])
    for cache in (True, False):
        cfg = TrainConfig(output_dir=str(tmp_path / "out"), data=f"{other}:0.5,{bad}:0.5", eval_fraction=0.2, max_steps=1,
                          data_cache=cache, data_cache_dir=str(tmp_path / "cache"))
        with pytest.raises(DataError) as err:
            Trainer(cfg)
        assert str(err.value) == f"data {str(bad)!r}: line 33: 'instruction' and 'output' must be strings, got NoneType and str"


def test_a_field_whose_type_changes_between_lines_is_named_by_line(tmp_path):
    rows = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(40)]
    lines = [json.dumps(r) for r in rows]
    lines[30] = json.dumps({"instruction": "Say x.", "input": 7, "output": "x"})
    # pyarrow refuses the changed type and datasets' pandas fallback a whitespace line: it said "Expected object or value"
    lines[10:10] = ["   "]
    path = write_lines(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataError) as err:
        load_rows(path)
    assert str(err.value) == f"data {str(path)!r}: line 32: 'input' is a number, but a str in line 1; expected one type per field"


def test_a_json_array_row_is_named_by_its_place_in_the_array(tokenizer, tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}, {"text": 5}]))
    with pytest.raises(DataError, match=r"row 3: 'text' is a number, but a str in row 1; expected one type per field"):
        tokenize_dataset(load_rows(path), "text", tokenizer, 128, False, str(path), file=path)


class CountingTokenizer:
    """The tiny tokenizer, recording the length of every text it is given."""

    def __init__(self, inner):
        self.inner, self.lengths = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, text, **kwargs):
        self.lengths.append(len(text))
        return self.inner(text, **kwargs)


@pytest.mark.parametrize(("fmt", "row"), [
    ("text", {"text": "word " * 4_000_000}),
    ("alpaca", {"instruction": "Repeat.", "input": "", "output": "word " * 4_000_000}),
    ("chat", {"messages": [{"role": "user", "content": "Repeat."}, {"role": "assistant", "content": "word " * 4_000_000}]}),
])
def test_a_20_mb_row_is_tokenized_only_as_far_as_max_seq_len_needs_and_loses_nothing(tokenizer, fmt, row, monkeypatch):
    counting = CountingTokenizer(tokenizer)
    capped = tokenize_row(row, fmt, counting, 64, False)
    assert max(counting.lengths) <= 64 * data.CHARS_PER_TOKEN_BOUND
    assert capped["truncated"] and len(capped["input_ids"]) == 64
    # The same tokens and labels as tokenizing the whole text (here 200 kB of it, enough to tell).
    short = json.loads(json.dumps(row).replace("word " * 4_000_000, "word " * 40_000))
    monkeypatch.setattr(data, "CHARS_PER_TOKEN_BOUND", 10**9)
    # (Tokenizing the whole 20 MB uncapped would take 15 s a case, for the same answer.)
    assert tokenize_row(short, fmt, tokenizer, 64, False) == capped
