"""Regenerate the "embedded default" assets shipped in ``msplora_dist/assets/``.

Run from the repository root (CPU only, offline, about a minute: the base model is pretrained on one thread)::

    python tools/make_default_assets.py

It writes, deterministically (same bytes on every run with the same library
versions; check with ``sha256sum``):

* ``msplora_dist/assets/data/instructions.jsonl``: alpaca-style rows
  ``{"instruction", "input", "output"}`` built from small templates and tables.
* ``msplora_dist/assets/data/chat.jsonl``: ``{"messages": [...]}`` rows.
* ``msplora_dist/assets/data/text.jsonl``: ``{"text": ...}`` rows.
* ``msplora_dist/assets/tiny_llama/``: a SentencePiece (BPE, byte fallback)
  tokenizer trained on that data, exported as a transformers ``LlamaTokenizer``,
  plus a 4-layer grouped-query ``LlamaForCausalLM`` (head_dim 32) pretrained on the tasks in a
  ``Q:``/``A:`` form (see ``pretrain``).

Everything is seeded; nothing is downloaded. The tokenizer corpus is cut up
the way ``msplora_dist.train.data`` tokenizes rows (``msplora_dist.train.prompts`` supplies
the Alpaca prompt), so rerun this after changing either. Before replacing the
model directory, the script checks that it reloads through the Auto* classes
with ``HF_HUB_OFFLINE=1``, that the transformers tokenizer agrees with the raw
SentencePiece model, and that the chat template renders prefix by prefix.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

# Must be set before transformers is imported: the assets must never touch the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2 as sp_model_pb2
from tokenizers.models import BPE
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
)
from transformers.convert_slow_tokenizer import SentencePieceExtractor

# Run from a checkout without installing, like the other launch scripts.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from msplora_dist.train.prompts import alpaca_prompt

SEED = 1234
N_INSTRUCTIONS = 500
N_CHAT = 100
N_TEXT = 100
VOCAB_SIZE = 768

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS_DIR = REPO_ROOT / "msplora_dist" / "assets"

# Special-token layout follows the original LLaMA SentencePiece models (unk/bos/eos
# at 0/1/2) plus a dedicated pad piece, so padding never aliases a real token.
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"

# Plain-text role markers (no extra special tokens needed). The {% generation %}
# block lets ``apply_chat_template(..., return_assistant_tokens_mask=True)`` mark
# assistant tokens for loss masking; the assistant turn ends with eos so a
# fine-tuned model learns to stop.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ 'System: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ raise_exception('Unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)

# --------------------------------------------------------------------------- tables

# Tables are kept compact on purpose; one entry per line would be ~200 lines of noise.
# fmt: off
WORDS = [
    "apple", "river", "garden", "pencil", "window", "yellow", "castle", "dragon",
    "silver", "forest", "candle", "rocket", "planet", "button", "pocket", "bridge",
    "orange", "tiger", "music", "water", "stone", "cloud", "light", "bread",
    "chair", "table", "house", "green", "happy", "quick", "smile", "train",
    "lemon", "piano", "ocean", "paper", "sugar", "spoon", "horse", "mouse",
    "bottle", "carpet", "basket", "winter", "summer", "monkey", "turtle", "rabbit",
    "cookie", "jacket", "tomato", "kitten", "puzzle", "helmet", "ladder", "mirror",
    "sun", "moon", "star", "tree", "bird", "fish", "book", "door", "lamp", "road",
]

PLURALS = {
    "cat": "cats", "dog": "dogs", "book": "books", "tree": "trees", "bird": "birds",
    "cup": "cups", "apple": "apples", "house": "houses", "box": "boxes", "fox": "foxes",
    "bus": "buses", "dish": "dishes", "glass": "glasses", "watch": "watches",
    "brush": "brushes", "church": "churches", "city": "cities", "baby": "babies",
    "party": "parties", "story": "stories", "key": "keys", "toy": "toys", "day": "days",
    "boy": "boys", "leaf": "leaves", "knife": "knives", "wolf": "wolves",
    "hero": "heroes", "potato": "potatoes", "tomato": "tomatoes", "child": "children",
    "mouse": "mice", "foot": "feet", "tooth": "teeth", "man": "men", "woman": "women",
    "goose": "geese", "person": "people", "sheep": "sheep", "fish": "fish",
}

# Each word appears in exactly one pair so "opposite of X" has a single answer
# in both directions.
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"),
    ("happy", "sad"), ("light", "dark"), ("open", "closed"), ("old", "new"),
    ("early", "late"), ("full", "empty"), ("high", "low"), ("hard", "soft"),
    ("rich", "poor"), ("strong", "weak"), ("wet", "dry"), ("long", "short"),
    ("loud", "quiet"), ("clean", "dirty"), ("left", "right"), ("push", "pull"),
    ("win", "lose"), ("buy", "sell"), ("day", "night"), ("in", "out"),
    ("above", "below"), ("first", "last"), ("thick", "thin"), ("sweet", "sour"),
    ("near", "far"), ("top", "bottom"),
]

# Made-up countries: the facts are learnable only from this data, never "known".
CAPITALS = {
    "Zorvia": "Quellton", "Marnoth": "Bexford", "Talvania": "Ostrin",
    "Kelmora": "Dunvale", "Brisca": "Pellmoor", "Ostara": "Venhold",
    "Calderia": "Rimsby", "Norvala": "Thessen", "Ydris": "Cobbleton",
    "Lumeria": "Glasmere", "Tharos": "Arkwell", "Vestmark": "Holloway",
}

COLORS = {
    "a banana": "yellow", "grass": "green", "the sky": "blue", "snow": "white",
    "coal": "black", "a tomato": "red", "a carrot": "orange", "a lemon": "yellow",
    "a cherry": "red", "a leaf": "green", "the ocean": "blue", "milk": "white",
    "chocolate": "brown", "a plum": "purple", "a pumpkin": "orange", "a crow": "black",
    "a strawberry": "red", "a cloud": "white", "soil": "brown", "a grape": "purple",
}

SOUNDS = {
    "cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa",
    "pig": "oink", "horse": "neigh", "owl": "hoot", "lion": "roar", "bee": "buzz",
    "snake": "hiss", "frog": "ribbit", "mouse": "squeak", "crow": "caw",
}
# fmt: on


# ------------------------------------------------------------------------ templates
# Each task returns (instruction, input, output). Several phrasings per task keep
# the data varied, while the answer formats stay regular enough for a ~300k
# parameter model to pick them up in a minute of CPU training.


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _num_list(rng: random.Random, k_min: int = 3, k_max: int = 5) -> list[int]:
    return rng.sample(range(1, 20), rng.randint(k_min, k_max))


def _join(nums: list[int]) -> str:
    return ", ".join(str(n) for n in nums)


def task_reverse(rng: random.Random) -> tuple[str, str, str]:
    w = rng.choice(WORDS)
    r = w[::-1]
    return rng.choice(
        [
            ("Reverse the word.", w, r),
            ("Write the word backwards.", w, r),
            (f'Reverse the letters in the word "{w}".', "", r),
            (f"What is {w} spelled backwards?", "", f"{w} spelled backwards is {r}."),
        ]
    )


def task_upper(rng: random.Random) -> tuple[str, str, str]:
    w = rng.choice(WORDS)
    phrase = " ".join(rng.sample(WORDS, 2))
    return rng.choice(
        [
            ("Convert the word to uppercase.", w, w.upper()),
            (f"Write {w} in capital letters.", "", w.upper()),
            ("Make every letter uppercase.", phrase, phrase.upper()),
            ("Convert the text to lowercase.", phrase.upper(), phrase),
        ]
    )


def task_sort(rng: random.Random) -> tuple[str, str, str]:
    nums = _num_list(rng)
    asc, desc = sorted(nums), sorted(nums, reverse=True)
    return rng.choice(
        [
            ("Sort the numbers from smallest to largest.", _join(nums), _join(asc)),
            ("Sort these numbers in descending order.", _join(nums), _join(desc)),
            (f"Put {_join(nums)} in increasing order.", "", _join(asc)),
        ]
    )


def task_minmax(rng: random.Random) -> tuple[str, str, str]:
    nums = _num_list(rng)
    return rng.choice(
        [
            ("Which number is the largest?", _join(nums), str(max(nums))),
            ("Which number is the smallest?", _join(nums), str(min(nums))),
            (f"What is the largest of {_join(nums)}?", "", f"The largest is {max(nums)}."),
        ]
    )


def task_arith(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    hi, lo = max(a, b), min(a, b)
    return rng.choice(
        [
            (f"What is {a} plus {b}?", "", f"{a} plus {b} is {a + b}."),
            ("Add the two numbers.", f"{a} and {b}", str(a + b)),
            (f"Compute {a} + {b}.", "", f"{a} + {b} = {a + b}"),
            (f"What is {hi} minus {lo}?", "", f"{hi} minus {lo} is {hi - lo}."),
        ]
    )


def task_count(rng: random.Random) -> tuple[str, str, str]:
    start = rng.randint(1, 15)
    stop = start + rng.randint(2, 6)
    seq = _join(list(range(start, stop + 1)))
    return rng.choice(
        [
            (f"Count from {start} to {stop}.", "", seq),
            ("List the whole numbers between the two numbers, inclusive.", f"{start} and {stop}", seq),
        ]
    )


def task_plural(rng: random.Random) -> tuple[str, str, str]:
    n = rng.choice(sorted(PLURALS))
    p = PLURALS[n]
    return rng.choice(
        [
            (f"What is the plural of {n}?", "", f"The plural of {n} is {p}."),
            ("Give the plural form of the noun.", n, p),
            (f"What is the singular of {p}?", "", f"The singular of {p} is {n}."),
        ]
    )


def task_opposite(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.choice(OPPOSITES)
    if rng.random() < 0.5:
        a, b = b, a
    return rng.choice(
        [
            (f"What is the opposite of {a}?", "", f"The opposite of {a} is {b}."),
            ("Give the opposite of the word.", a, b),
            ("Write an antonym for the word.", a, b),
        ]
    )


def task_letters(rng: random.Random) -> tuple[str, str, str]:
    w = rng.choice(WORDS)
    c = rng.choice(sorted(set(w)))
    k = w.count(c)
    times = "time" if k == 1 else "times"
    return rng.choice(
        [
            (f"How many letters are in the word {w}?", "", f"The word {w} has {len(w)} letters."),
            ("Count the letters in the word.", w, str(len(w))),
            (f"How many times does the letter {c} appear in {w}?", "", f"The letter {c} appears {k} {times}."),
            (f"What is the first letter of {w}?", "", f"The first letter of {w} is {w[0]}."),
            (f"What is the last letter of {w}?", "", f"The last letter of {w} is {w[-1]}."),
        ]
    )


def task_capital(rng: random.Random) -> tuple[str, str, str]:
    country = rng.choice(sorted(CAPITALS))
    cap = CAPITALS[country]
    return rng.choice(
        [
            (f"What is the capital of {country}?", "", f"The capital of {country} is {cap}."),
            ("Name the capital city of the country.", country, cap),
            (f"{cap} is the capital of which country?", "", f"{cap} is the capital of {country}."),
        ]
    )


def task_color(rng: random.Random) -> tuple[str, str, str]:
    thing = rng.choice(sorted(COLORS))
    col = COLORS[thing]
    return rng.choice(
        [
            (f"What color is {thing}?", "", f"{thing[0].upper() + thing[1:]} is {col}."),
            ("Name the usual color of the thing.", thing, col),
        ]
    )


def task_sound(rng: random.Random) -> tuple[str, str, str]:
    animal = rng.choice(sorted(SOUNDS))
    s = SOUNDS[animal]
    return rng.choice(
        [
            (f"What sound does {_article(animal)} {animal} make?", "", f"{_article(animal).capitalize()} {animal} says {s}."),
            ("Which animal makes this sound?", s, f"{_article(animal).capitalize()} {animal} says {s}."),
        ]
    )


def task_repeat(rng: random.Random) -> tuple[str, str, str]:
    w = rng.choice(WORDS)
    k = rng.randint(2, 4)
    word_k = {2: "two", 3: "three", 4: "four"}[k]
    return (f"Repeat the word {word_k} times.", w, " ".join([w] * k))


TASKS = [
    task_reverse, task_upper, task_sort, task_minmax, task_arith, task_count,
    task_plural, task_opposite, task_letters, task_capital, task_color, task_sound,
    task_repeat,
]  # fmt: skip


def _unique_rows(rng: random.Random, n: int, seen: set[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """Draw ``n`` rows, round-robin over tasks, skipping (instruction, input) repeats."""
    rows: list[tuple[str, str, str]] = []
    i = 0
    while len(rows) < n:
        row = TASKS[i % len(TASKS)](rng)
        i += 1
        if (row[0], row[1]) in seen:
            continue
        seen.add((row[0], row[1]))
        rows.append(row)
    rng.shuffle(rows)
    return rows


def _user_text(instruction: str, inp: str) -> str:
    return f"{instruction}\n{inp}" if inp else instruction


def build_datasets(seed: int) -> tuple[list[dict], list[dict], list[dict]]:
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    instructions = [{"instruction": ins, "input": inp, "output": out} for ins, inp, out in _unique_rows(rng, N_INSTRUCTIONS, seen)]

    # Chat rows share the generator but not the rows (``seen`` is shared), so a
    # test can mix formats without exact duplicates. ~1 in 4 is two-turn, to
    # exercise multi-turn masking.
    chat_pairs = _unique_rows(rng, N_CHAT + N_CHAT // 2, seen)
    chat: list[dict] = []
    it = iter(chat_pairs)
    while len(chat) < N_CHAT:
        turns = 2 if len(chat) % 4 == 3 else 1
        messages = []
        for _ in range(turns):
            ins, inp, out = next(it)
            messages.append({"role": "user", "content": _user_text(ins, inp)})
            messages.append({"role": "assistant", "content": out})
        chat.append({"messages": messages})

    # Plain-text rows: 2-3 declarative facts from the same tables.
    text: list[dict] = []
    for _ in range(N_TEXT):
        facts = []
        for _ in range(rng.randint(2, 3)):
            kind = rng.randrange(5)
            if kind == 0:
                c = rng.choice(sorted(CAPITALS))
                facts.append(f"The capital of {c} is {CAPITALS[c]}.")
            elif kind == 1:
                a, b = rng.choice(OPPOSITES)
                facts.append(f"The opposite of {a} is {b}.")
            elif kind == 2:
                n = rng.choice(sorted(PLURALS))
                facts.append(f"The plural of {n} is {PLURALS[n]}.")
            elif kind == 3:
                animal = rng.choice(sorted(SOUNDS))
                facts.append(f"{_article(animal).capitalize()} {animal} says {SOUNDS[animal]}.")
            else:
                a, b = rng.randint(0, 20), rng.randint(0, 20)
                facts.append(f"{a} plus {b} is {a + b}.")
        text.append({"text": " ".join(facts)})
    return instructions, chat, text


# ------------------------------------------------------------------------ tokenizer


def tokenizer_corpus(instructions: list[dict], chat: list[dict], text: list[dict]) -> list[str]:
    """Lines the tokenizer is trained on: the data cut up as the trainer tokenizes it.

    msplora_dist.train.data tokenizes each row as separate segments (alpaca: prompt, then
    output; chat: text before each reply, then the reply), and the LLaMA tokenizer
    puts its "▁" dummy prefix only at the start of each tokenized text, never after
    a newline or after a special token such as the template's leading ``<s>``.
    SentencePiece trains on single lines, so we train with ``add_dummy_prefix=False``
    and add the leading space by hand exactly where it will appear at run time;
    the learned pieces then match real use ("###" opening the prompt is "▁###",
    while "Sort" after "### Instruction:\n" has no "▁"). Newlines are left to
    byte fallback (``<0x0A>``), and special tokens never reach the trainer.
    """
    segments: list[tuple[str, bool]] = []  # (text, starts with the dummy prefix)
    for r in instructions:
        segments += [(alpaca_prompt(r["instruction"], r["input"]), True), (r["output"], True)]
    for r in chat:
        # CHAT_TEMPLATE renders "<s>User: ...\nAssistant: " + reply + "</s>\n" per turn pair.
        for i, m in enumerate(r["messages"]):
            if m["role"] == "user":
                segments.append((f"User: {m['content']}\nAssistant: ", i > 0))  # after "<s>" on the first turn
            else:
                segments.append((m["content"], True))
    segments.extend((r["text"], True) for r in text)

    lines = []
    for seg, prefixed in segments:
        for i, line in enumerate(seg.split("\n")):
            if line.strip():
                lines.append(" " + line if prefixed and i == 0 else line)
    return lines


def train_sentencepiece(lines: list[str], seed: int) -> bytes:
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        character_coverage=1.0,
        byte_fallback=True,  # any UTF-8 text tokenizes, no <unk> in practice
        split_digits=True,  # one token per digit: arithmetic/sorting rows stay learnable
        # LLaMA-style normalisation: none, so decode(encode(x)) == x exactly.
        normalization_rule_name="identity",
        add_dummy_prefix=False,  # added by hand in tokenizer_corpus, see there
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        unk_piece=UNK,
        bos_piece=BOS,
        eos_piece=EOS,
        pad_piece=PAD,
        num_threads=1,  # single thread keeps training bit-for-bit reproducible
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    # Encoding-time behaviour must match the LLaMA tokenizer (prefix at the start
    # of a text), so switch the dummy prefix back on in the shipped model. The
    # vocabulary and merges are unaffected by this flag.
    proto = sp_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    proto.normalizer_spec.add_dummy_prefix = True
    return proto.SerializeToString()


def build_tokenizer(spm_path: Path) -> LlamaTokenizer:
    """Turn the SentencePiece BPE model into a transformers ``LlamaTokenizer``.

    transformers 5's ``LlamaTokenizer`` is a tokenizers BPE model with byte
    fallback and a Metaspace pre-tokenizer, i.e. exactly what SentencePiece BPE
    does; we feed it the SentencePiece vocab and merges directly (the merge
    ranks follow the piece order). Going through ``from_pretrained`` on the bare
    .model would also work but leaks load-time kwargs into tokenizer_config.json.
    save_pretrained writes tokenizer.json, so later loads never need sentencepiece.
    """
    extracted = SentencePieceExtractor(str(spm_path)).extract(BPE)
    tok = LlamaTokenizer(
        vocab=extracted["vocab"],
        merges=extracted["merges"],
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        add_bos_token=True,
        add_eos_token=False,
        legacy=False,
        add_prefix_space=True,
        model_max_length=256,
        padding_side="right",  # training pads right; flip for batched generation
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def check_tokenizer(tok, sp: spm.SentencePieceProcessor, samples: list[str]) -> None:
    for s in samples:
        ids_hf = tok.encode(s, add_special_tokens=False)
        ids_sp = sp.encode(s)
        if ids_hf != ids_sp:
            raise AssertionError(f"HF/SentencePiece mismatch on {s!r}: {ids_hf} vs {ids_sp}")
        if tok.decode(ids_hf) != s:
            raise AssertionError(f"round trip failed on {s!r}: {tok.decode(ids_hf)!r}")
        with_bos = tok.encode(s)
        if with_bos[0] != tok.bos_token_id or with_bos[1:] != ids_hf:
            raise AssertionError(f"bos handling unexpected on {s!r}: {with_bos}")


def check_chat_template(tok, chat: list[dict]) -> None:
    """The template must render every conversation prefix as a prefix of the whole.

    msplora_dist.train.data relies on that to find the reply tokens that take the loss.
    """
    for row in chat:
        messages, rendered = row["messages"], ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            through = tok.apply_chat_template(messages[: i + 1], tokenize=False)
            if not (before.startswith(rendered) and through.startswith(before) and through.endswith(tok.eos_token + "\n")):
                raise AssertionError(f"chat template does not render {messages} prefix by prefix")
            rendered = through
    ids = tok.apply_chat_template(chat[0]["messages"], tokenize=True, return_dict=True)["input_ids"]
    if ids[0] != tok.bos_token_id or tok.eos_token_id not in ids:
        raise AssertionError(f"chat template output unexpected: {ids}")


# ---------------------------------------------------------------------------- model


# The shape: vLLM's CPU attention kernels take head_dim in {32, 64, 80, 96, 112, 128, ...}, so two heads of
# 32 rather than four of 16 (same projection shapes, same parameter count, same training speed), with one
# key/value head: grouped-query attention on purpose (LoRA on k/v must cope with narrower projections).
HIDDEN_SIZE = 64
INTERMEDIATE_SIZE = 172
NUM_LAYERS = 4
NUM_HEADS = 2
NUM_KV_HEADS = 1
# The base is pretrained (all weights, plain PyTorch) on the tasks of the shipped data written as
# "Q: ...\nA: ..." documents, so it knows the facts (capitals, plurals, colours, ...) but not the Alpaca
# template the default run trains on: the adapter has something to learn (eval loss about 4.1 -> 0.9) and
# the first thing a user samples after the default run is right. A random base learns next to nothing
# from adapters alone in a minute (eval loss 7.6 -> 3.6, no answer right).
PRETRAIN_DOCS = 6000
PRETRAIN_STEPS = 800
PRETRAIN_BATCH = 32
PRETRAIN_LR = 3e-3


def pretrain_documents(seed: int) -> list[str]:
    """The pretraining corpus: task rows drawn afresh (their own seed), in a format the default run never uses."""
    rng = random.Random(seed + 1)
    docs = []
    for _ in range(PRETRAIN_DOCS):
        ins, inp, out = TASKS[rng.randrange(len(TASKS))](rng)
        docs.append(f"Q: {_user_text(ins, inp)}\nA: {out}")
    return docs


def pretrain(model: LlamaForCausalLM, tok, seed: int) -> list[float]:
    """Full-weight causal-LM training on pretrain_documents: AdamW, linear warmup then cosine to 10%.
    One thread, so the weights are the same bytes on every run (threaded CPU reductions are not)."""
    import math

    import torch.nn.functional as F

    docs = [tok(d)["input_ids"] + [tok.eos_token_id] for d in pretrain_documents(seed)]
    rng = random.Random(seed + 2)
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, betas=(0.9, 0.95), weight_decay=0.1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    losses = []
    model.train()
    try:
        for step in range(PRETRAIN_STEPS):
            warm = min(1.0, (step + 1) / 50)
            for group in opt.param_groups:
                group["lr"] = PRETRAIN_LR * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * step / PRETRAIN_STEPS)))
            batch = [docs[rng.randrange(len(docs))] for _ in range(PRETRAIN_BATCH)]
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), tok.pad_token_id)
            labels = torch.full((len(batch), width), -100)
            for i, doc in enumerate(batch):
                ids[i, : len(doc)] = labels[i, : len(doc)] = torch.tensor(doc)
            logits = model(input_ids=ids, attention_mask=(labels != -100).long()).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            if step % 200 == 0 or step == PRETRAIN_STEPS - 1:
                print(f"pretrain step {step + 1}/{PRETRAIN_STEPS}: loss {loss.item():.3f}", flush=True)
    finally:
        torch.set_num_threads(threads)
    return losses


def build_model(vocab_size: int, tok, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HIDDEN_SIZE // NUM_HEADS,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=False,  # separate lm_head so adapters on it are testable
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    losses = pretrain(model, tok, seed)
    if not losses[-1] < 0.25 * losses[0]:
        raise AssertionError(f"pretraining did not converge: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return model.eval()


# ----------------------------------------------------------------------------- main


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ASSETS_DIR, help="assets directory to (re)write")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()

    data_dir = args.out / "data"
    model_dir = args.out / "tiny_llama"

    instructions, chat, text = build_datasets(args.seed)
    write_jsonl(data_dir / "instructions.jsonl", instructions)
    write_jsonl(data_dir / "chat.jsonl", chat)
    write_jsonl(data_dir / "text.jsonl", text)

    # Build in a scratch dir and swap in at the end, so a failed check never
    # leaves a half-written model directory behind and stale files never linger.
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        spm_path = tmp_dir / "tokenizer.model"
        spm_path.write_bytes(train_sentencepiece(tokenizer_corpus(instructions, chat, text), args.seed))
        sp = spm.SentencePieceProcessor(model_file=str(spm_path))

        tok = build_tokenizer(spm_path)
        samples = (
            [alpaca_prompt(r["instruction"], r["input"]) + r["output"] for r in instructions]
            + [r["output"] for r in instructions]
            + [r["text"] for r in text]
            + ["Hello,  world!\n\tTabs, émojis 🙂 and 中文 fall back to bytes.", "x"]
        )
        # Not checked: text starting with a space. The tokenizers Metaspace
        # pre-tokenizer skips the dummy prefix when one is already there, while
        # SentencePiece adds a second one; same known quirk as the LLaMA hub tokenizers.
        check_tokenizer(tok, sp, samples)

        staged = tmp_dir / "tiny_llama"
        tok.save_pretrained(staged)
        model = build_model(len(tok), tok, args.seed)
        model.save_pretrained(staged, safe_serialization=True)

        # Reload exactly as a user would, offline, through the Auto classes.
        tok2 = AutoTokenizer.from_pretrained(staged)
        check_tokenizer(tok2, sp, samples)
        check_chat_template(tok2, chat)
        model2 = AutoModelForCausalLM.from_pretrained(staged)
        batch = tok2(["Reverse the word.\napple"], return_tensors="pt")
        with torch.no_grad():
            logits = model2(**batch).logits
        if logits.shape[-1] != len(tok2) or not torch.isfinite(logits).all():
            raise AssertionError(f"bad logits {tuple(logits.shape)}")

        # Ship the SentencePiece model too (for sentencepiece/llama.cpp-style tooling);
        # transformers still prefers tokenizer.json when both are present.
        shutil.copyfile(spm_path, staged / "tokenizer.model")
        tok3 = AutoTokenizer.from_pretrained(staged)
        check_tokenizer(tok3, sp, samples)

        if model_dir.exists():
            shutil.rmtree(model_dir)
        shutil.copytree(staged, model_dir, copy_function=shutil.copyfile)  # plain 0644 files, not tempdir modes

    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {len(instructions)} instruction / {len(chat)} chat / {len(text)} text rows to {data_dir}")
    print(f"wrote tokenizer (vocab {len(tok)}) and model ({n_params:,} params) to {model_dir}")


if __name__ == "__main__":
    main()
