"""The data pipeline: formats, loss masks, truncation, packing, and split-independent sampling."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from msplora_dist.errors import DataError
from msplora_dist.train.config import ASSETS
from msplora_dist.train.data import (
    IGNORE_INDEX,
    GlobalBatchSampler,
    collate,
    eval_batches,
    pack_examples,
    tokenize_dataset,
    tokenize_row,
)
from msplora_dist.train.prompts import alpaca_prompt
from msplora_dist.train.rows import detect_format, load_rows

TINY = ASSETS / "tiny_llama"


@pytest.fixture(scope="module")
def tokenizer():
    tok = AutoTokenizer.from_pretrained(str(TINY))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_alpaca_row_takes_loss_on_response_and_eos_only(tokenizer):
    row = {"instruction": "Reverse the word.", "input": "cat", "output": "tac"}
    ex = tokenize_row(row, "alpaca", tokenizer, 256, train_on_prompt=False)
    prompt = alpaca_prompt("Reverse the word.", "cat")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    whole_ids = tokenizer(prompt + "tac", add_special_tokens=False)["input_ids"]
    assert whole_ids[:len(prompt_ids)] == prompt_ids  # the prompt ends with a newline: a token boundary
    response_ids = [*whole_ids[len(prompt_ids):], tokenizer.eos_token_id]
    assert ex["input_ids"] == [tokenizer.bos_token_id, *prompt_ids, *response_ids]
    assert ex["labels"] == [IGNORE_INDEX] * (1 + len(prompt_ids)) + response_ids
    assert ex["num_loss_tokens"] == len(response_ids)


def test_the_response_is_tokenized_as_part_of_the_running_text(tokenizer):
    # Tokenized alone, "1, 2" would begin with SentencePiece's word-start piece; after "Response:\n"
    # it does not. Training must see the tokens that generation continues from the prompt.
    row = {"instruction": "Count.", "input": "", "output": "1, 2"}
    ex = tokenize_row(row, "alpaca", tokenizer, 256, train_on_prompt=False)
    alone = tokenizer("1, 2", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(alone)[0] == "\u2581"  # what the old, piecewise tokenization trained on
    learned = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert learned == [*tokenizer(alpaca_prompt("Count.") + "1, 2", add_special_tokens=False)["input_ids"][-len(alone) + 1:],
                       tokenizer.eos_token_id]
    assert tokenizer.decode(learned, skip_special_tokens=True) == "1, 2"


def test_first_token_never_takes_loss_without_a_bos_token_so_packing_stays_within_examples(tokenizer, tmp_path):
    no_bos = AutoTokenizer.from_pretrained(str(TINY))
    no_bos.bos_token = None  # as Qwen2's tokenizer
    rows = [{"text": "first document"}, {"text": "second one"}]
    ds = tokenize_dataset(load_rows(write_jsonl(tmp_path / "d.jsonl", rows)), "text", no_bos, 64, False, "d").dataset
    assert all(labels[0] == IGNORE_INDEX for labels in ds["labels"])
    packed = pack_examples(ds, 64, seed=0)
    assert len(packed) == 1
    # Every loss token of the packed row is counted, and none predicts across the document boundary.
    assert sum(1 for t in packed[0]["labels"] if t != IGNORE_INDEX) == packed[0]["num_loss_tokens"] == sum(ds["num_loss_tokens"])


def test_train_on_prompt_takes_loss_everywhere_but_bos(tokenizer):
    row = {"instruction": "Say hi.", "input": "", "output": "hi"}
    ex = tokenize_row(row, "alpaca", tokenizer, 256, train_on_prompt=True)
    assert ex["labels"][0] == IGNORE_INDEX and ex["labels"][1:] == ex["input_ids"][1:]


def test_chat_rows_take_loss_on_assistant_turns_only(tokenizer):
    messages = [{"role": "user", "content": "add 2 and 3"}, {"role": "assistant", "content": "5"},
                {"role": "user", "content": "and 4?"}, {"role": "assistant", "content": "9"}]
    ex = tokenize_row({"messages": messages}, "chat", tokenizer, 256, train_on_prompt=False)
    learned = tokenizer.decode([t for t in ex["labels"] if t != IGNORE_INDEX])
    assert "5" in learned and "9" in learned
    assert "add" not in learned and "and 4" not in learned
    # The whole conversation is rendered by the chat template, token for token.
    assert tokenizer.decode(ex["input_ids"]).replace(" ", "") == \
        tokenizer.apply_chat_template(messages, tokenize=False).replace(" ", "")


def test_a_conversation_opening_with_the_assistant_takes_no_loss_on_the_header(tokenizer):
    messages = [{"role": "assistant", "content": "Hi, how can I help?"}, {"role": "user", "content": "bye"}]
    ex = tokenize_row({"messages": messages}, "chat", tokenizer, 256, train_on_prompt=False)
    learned = tokenizer.decode([t for t in ex["labels"] if t != IGNORE_INDEX])
    assert learned.startswith("Hi, how can I help?") and "Assistant" not in learned and "bye" not in learned
    # Content that also occurs inside the header ("s" in "<s>") must not move the cut.
    ex = tokenize_row({"messages": [{"role": "assistant", "content": "s"}]}, "chat", tokenizer, 256, train_on_prompt=False)
    assert "Assistant" not in tokenizer.decode([t for t in ex["labels"] if t != IGNORE_INDEX])


class OffsetlessTokenizer:
    """The tiny tokenizer seen as a slow one: ids only, no offsets."""

    is_fast = False

    def __init__(self, fast):
        self.fast = fast

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": self.fast(text, add_special_tokens=add_special_tokens)["input_ids"]}


def test_the_loss_mask_of_tokenizers_without_offsets_equals_the_offset_one(tokenizer):
    from msplora_dist.train.data import _loss_mask

    # "Assistant: " ends with a space that SentencePiece tokenizes alone as a prefix, but joins to "Hi" in
    # the whole text: the reply's first token must still take loss.
    for text, learned in [("<s>User: hey\nAssistant: Hi there</s>\nUser: bye\n", "Hi there</s>"),
                          ("### Response:\n1, 2", "1, 2"), ("a b c d", "a b c d")]:
        spans = [(text.index(learned), text.index(learned) + len(learned))]
        ids, mask = _loss_mask(OffsetlessTokenizer(tokenizer), text, spans)
        assert (ids, mask) == _loss_mask(tokenizer, text, spans), text
        assert tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m]).strip() == learned


@pytest.mark.parametrize(("row", "fmt", "fragment"), [
    ({"instruction": "Add.", "input": 5, "output": "x"}, "alpaca", "row 7: 'input' must be a string (or absent), got int"),
    ({"messages": [{"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}]}, "chat",
     "row 7: the tokenizer's chat template refused the conversation: no system turns"),
])
def test_rows_a_template_cannot_take_are_a_data_error_with_the_row(tokenizer, row, fmt, fragment):
    strict = AutoTokenizer.from_pretrained(str(TINY))
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}"
                            "{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(DataError, match=re.escape(fragment)):
        tokenize_row(row, fmt, strict, 256, train_on_prompt=False, where="row 7")


def test_truncation_is_counted_and_rows_without_response_are_dropped(tokenizer, tmp_path):
    rows = [{"instruction": "word " * 200, "input": "", "output": "x"},
            {"instruction": "short", "input": "", "output": "answer " * 50},
            {"instruction": "short", "input": "", "output": "ok"}]
    ds = load_rows(write_jsonl(tmp_path / "d.jsonl", rows))
    out = tokenize_dataset(ds, "alpaca", tokenizer, 64, False, "d.jsonl")
    assert out.num_truncated == 2 and out.num_dropped == 1 and len(out.dataset) == 2
    assert max(len(r) for r in out.dataset["input_ids"]) <= 64


def test_every_row_too_long_is_a_clear_error(tokenizer, tmp_path):
    ds = load_rows(write_jsonl(tmp_path / "d.jsonl", [{"instruction": "word " * 200, "input": "", "output": "x"}]))
    with pytest.raises(DataError, match="max_seq_len=32"):
        tokenize_dataset(ds, "alpaca", tokenizer, 32, False, "d.jsonl")


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    with pytest.raises(DataError, match="line 3"):
        load_rows(path)


def test_unknown_fields_list_found_and_expected(tmp_path):
    ds = load_rows(write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}]))
    with pytest.raises(DataError, match=r"\['answer', 'question'\].*instruction, output"):
        detect_format(ds, "d.jsonl")


def test_missing_data_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_rows(tmp_path / "nope.jsonl")


def test_parquet_and_save_to_disk_load_like_jsonl(tmp_path):
    rows = [{"text": f"row {i}"} for i in range(5)]
    ds = load_rows(write_jsonl(tmp_path / "d.jsonl", rows))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    assert load_rows(tmp_path / "d.parquet")["text"] == ds["text"] == load_rows(tmp_path / "saved")["text"]


@pytest.mark.parametrize(("world", "micro", "accum"), [(1, 8, 1), (2, 4, 1), (2, 2, 2), (4, 1, 2), (1, 1, 8)])
def test_global_batch_holds_the_same_examples_whatever_the_split(world, micro, accum):
    sampler = GlobalBatchSampler(50, 8, seed=3)
    reference = GlobalBatchSampler(50, 8, seed=3)
    for step in range(14):  # crosses an epoch boundary (6 steps per epoch)
        got = sorted(i for a in range(accum) for r in range(world)
                     for i in sampler.micro_batch_indices(step, a, r, world, micro))
        assert got == sorted(reference.global_batch_indices(step))
    # Each epoch is a permutation: no example repeats within it, the partial last batch is dropped.
    epoch0 = [i for s in range(6) for i in reference.global_batch_indices(s)]
    assert len(set(epoch0)) == 48


def test_eval_batches_give_every_rank_the_same_number_of_batches():
    for n in (1, 5, 9, 10):
        shares = [eval_batches(n, 2, r, 3) for r in range(3)]
        assert len({len(s) for s in shares}) == 1
        assert sorted(i for s in shares for b in s for i in b) == list(range(n))


def test_packed_row_gives_each_example_the_loss_it_has_alone(tokenizer, tmp_path):
    rows = [{"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i)))} for i in range(2, 6)]
    ds = tokenize_dataset(load_rows(write_jsonl(tmp_path / "d.jsonl", rows)), "alpaca", tokenizer, 128, False, "d").dataset
    packed = pack_examples(ds, 128, seed=0)
    assert len(packed) == 1 and sum(packed["num_loss_tokens"]) == sum(ds["num_loss_tokens"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa",
                                         use_cache=False)).eval()  # a cache turns packed-sequence masking off

    def total_loss(batch):
        labels = batch.pop("labels")
        logits = model(**batch).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")

    with torch.no_grad():
        alone = sum(total_loss(collate([ds[i]], tokenizer.pad_token_id)) for i in range(len(ds)))
        together = total_loss(collate([packed[0]], tokenizer.pad_token_id))
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-4)


def test_collate_pads_right_and_masks_padding(tokenizer):
    a = {"input_ids": [1, 5, 6], "labels": [-100, 5, 6], "num_loss_tokens": 2}
    b = {"input_ids": [1, 7], "labels": [-100, 7], "num_loss_tokens": 1}
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_chat_template_that_writes_bos_gets_exactly_one(tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ex = tokenize_row({"messages": messages}, "chat", tokenizer, 256, train_on_prompt=False)
    assert ex["input_ids"].count(tokenizer.bos_token_id) == 1 and ex["input_ids"][0] == tokenizer.bos_token_id


@pytest.mark.parametrize(("encoding", "fragment"), [("utf-16", "is UTF-16 encoded"), ("latin-1", "is not UTF-8 (an invalid byte")])
def test_json_that_is_not_utf8_says_so(tmp_path, encoding, fragment):
    path = tmp_path / "d.jsonl"
    path.write_bytes(('{"text": "caf\u00e9"}\n' * 3).encode(encoding))
    with pytest.raises(DataError, match=re.escape(fragment)):
        load_rows(path)


def test_a_json_file_of_one_object_is_refused_rather_than_read_as_one_row(tmp_path):
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"instruction": "a", "output": "b"}))
    with pytest.raises(DataError, match="holds one JSON object; expected a JSON array of rows, or JSON Lines"):
        load_rows(one)
    lines = tmp_path / "lines.json"  # JSON Lines under a .json name still loads
    lines.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert len(load_rows(lines)) == 2
