"""Regenerate the "embedded default" assets shipped in ``msplora_dist/assets/``.

Run from the repository root (CPU only, offline, well under a minute)::

    python launch/make_default_assets.py

It writes, deterministically (same bytes on every run with the same library
versions; check with ``sha256sum``):

* ``msplora_dist/assets/data/instructions.jsonl``: alpaca-style rows
  ``{"instruction", "input", "output"}`` built from small templates and tables.
* ``msplora_dist/assets/data/chat.jsonl``: ``{"messages": [...]}`` rows.
* ``msplora_dist/assets/data/text.jsonl``: ``{"text": ...}`` rows.
* ``msplora_dist/assets/tiny_llama/``: a SentencePiece (BPE, byte fallback)
  tokenizer trained on that data, exported as a transformers ``LlamaTokenizer``,
  plus a randomly initialised 4-layer grouped-query ``LlamaForCausalLM``.

Everything is seeded; nothing is downloaded. The script also checks that the
saved directory reloads through the Auto* classes with ``HF_HUB_OFFLINE=1``
and that the transformers tokenizer agrees with the raw SentencePiece model.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

# Must be set before transformers is imported: the assets must never touch the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import sentencepiece as spm
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
)

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

# The standard Alpaca prompt. Its header lines are included in the tokenizer
# corpus (they are what trainers usually wrap rows in), so they become a few
# whole-word pieces instead of hundreds of byte-fallback tokens.
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

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
    instructions = [
        {"instruction": ins, "input": inp, "output": out}
        for ins, inp, out in _unique_rows(rng, N_INSTRUCTIONS, seen)
    ]

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
    """Lines the tokenizer is trained on: the data as a trainer would render it.

    SentencePiece trains on lines, so multi-line prompts are split; newlines
    themselves are left to byte fallback (``<0x0A>``).
    """
    docs = []
    for r in instructions:
        tmpl = ALPACA_PROMPT_WITH_INPUT if r["input"] else ALPACA_PROMPT_NO_INPUT
        docs.append(tmpl.format(**r) + r["output"])
    for r in chat:
        docs.append(
            "\n".join(
                ("User: " if m["role"] == "user" else "Assistant: ") + m["content"]
                for m in r["messages"]
            )
        )
    docs.extend(r["text"] for r in text)
    return [line for doc in docs for line in doc.split("\n") if line.strip()]


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
        add_dummy_prefix=True,
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
    return model.getvalue()


def build_tokenizer(spm_dir: Path) -> LlamaTokenizer:
    """Load ``spm_dir/tokenizer.model`` as a transformers ``LlamaTokenizer``.

    transformers 5 only converts a SentencePiece model into its tokenizers BPE
    backend (with byte fallback) inside ``from_pretrained``; constructing the
    class directly with ``vocab_file`` yields an empty vocab. save_pretrained
    then writes tokenizer.json, so later loads never need sentencepiece.
    """
    tok = LlamaTokenizer.from_pretrained(
        spm_dir,
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


# ---------------------------------------------------------------------------- model


def build_model(vocab_size: int, tok, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention on purpose (LoRA on k/v must cope)
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,  # separate lm_head so adapters on it are testable
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model.to(torch.float32).eval()


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
        spm_dir = tmp_dir / "spm"
        spm_dir.mkdir()
        spm_path = spm_dir / "tokenizer.model"
        spm_path.write_bytes(train_sentencepiece(tokenizer_corpus(instructions, chat, text), args.seed))
        sp = spm.SentencePieceProcessor(model_file=str(spm_path))

        tok = build_tokenizer(spm_dir)
        samples = (
            [_user_text(r["instruction"], r["input"]) + "\n" + r["output"] for r in instructions]
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
        chat_ids = tok2.apply_chat_template(chat[0]["messages"], tokenize=True)
        if not isinstance(chat_ids, list):  # transformers 5 returns a BatchEncoding
            chat_ids = chat_ids["input_ids"]
        if chat_ids[0] != tok2.bos_token_id or tok2.eos_token_id not in chat_ids:
            raise AssertionError(f"chat template output unexpected: {chat_ids}")
        model2 = AutoModelForCausalLM.from_pretrained(staged)
        batch = tok2(["Reverse the word.\napple"], return_tensors="pt")
        with torch.no_grad():
            logits = model2(**batch).logits
        if logits.shape[-1] != len(tok2) or not torch.isfinite(logits).all():
            raise AssertionError(f"bad logits {tuple(logits.shape)}")

        if model_dir.exists():
            shutil.rmtree(model_dir)
        shutil.copytree(staged, model_dir)

    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {len(instructions)} instruction / {len(chat)} chat / {len(text)} text rows to {data_dir}")
    print(f"wrote tokenizer (vocab {len(tok)}) and model ({n_params:,} params) to {model_dir}")


if __name__ == "__main__":
    main()
