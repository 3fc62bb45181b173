"""The quality study's second task: numbers between digits and English words, generated from a seed.

    python -m experiments.quality.numbers --root runs/smol/numbers            # train 2000 / dev 200 / test 500 rows
    python -m experiments.quality.numbers --root runs/quality-smoke/numbers --train 32 --dev 8 --test 8

Each row is one alpaca example in one of two directions, chosen by the seeded generator:

    instruction "Write this number in English words."  input "73,204"  output "seventy-three thousand two hundred four"
    instruction "Write this number in digits."  input "seventy-three thousand two hundred four"  output "73,204"

The convention is fixed and written down here, so a model has to learn it, and a prediction is right only if
it is the exact string (whitespace runs collapsed, nothing else forgiven): lower case, tens and units joined by
a hyphen, no "and", no commas in words; scale words thousand, million, billion (short scale); digits grouped by
commas. Numbers have 1 to --max_digits digits, the digit count uniform (so large numbers, where one slip breaks
the answer, are as common as small ones), and every number appears in one split only.

Why it is a fair second test: it is the opposite kind of task to the docstrings (a deterministic, compositional
mapping with one right answer, scored by exact match, against open-ended text scored by chrF), the data are
generated here from a seed (nothing the base model could have memorised row by row, nothing downloaded), and
both methods see the same rows in the same order. The base model (an instruction model) knows number words
but not this exact convention, and long numbers need the mapping applied exactly, so there is headroom above
what a few hundred steps reach.

Outputs under --root/task: train.jsonl, dev.jsonl, test.jsonl, manifest.json (task "numbers", metric
"exact_match", the seed, counts per split and digit count, sha256 of each file), the layout make_task.py writes.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from experiments.quality import qlib
from msplora_dist.utils.fileio import sha256_file

TO_WORDS = "Write this number in English words."
TO_DIGITS = "Write this number in digits."
SPLITS = ("train", "dev", "test")
DEFAULT_SEED = 20260101

ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve", "thirteen",
        "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
SCALES = ("", "thousand", "million", "billion")


def _below_thousand(n: int) -> list[str]:
    words = []
    if n >= 100:
        words += [ONES[n // 100], "hundred"]
        n %= 100
    if n >= 20:
        words.append(TENS[n // 10] + (f"-{ONES[n % 10]}" if n % 10 else ""))
    elif n:
        words.append(ONES[n])
    return words


def to_words(n: int) -> str:
    """English words of 0 <= n < 10**12 in this task's convention."""
    if not 0 <= n < 1000 ** len(SCALES):
        raise ValueError(f"{n}: expected 0 <= n < {1000 ** len(SCALES)}")
    if n == 0:
        return ONES[0]
    words, scale = [], 0
    while n:
        n, group = divmod(n, 1000)
        if group:
            words = _below_thousand(group) + ([SCALES[scale]] if SCALES[scale] else []) + words
        scale += 1
    return " ".join(words)


def to_digits(n: int) -> str:
    return f"{n:,}"


def sample_numbers(rng: random.Random, count: int, max_digits: int, taken: set[int]) -> list[int]:
    """`count` distinct numbers not in `taken` (which grows), the digit count uniform in 1..max_digits."""
    out = []
    while len(out) < count:
        d = rng.randint(1, max_digits)
        n = rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)
        if n not in taken:
            taken.add(n)
            out.append(n)
    return out


def make_row(n: int, to_word_form: bool) -> dict:
    if to_word_form:
        return {"instruction": TO_WORDS, "input": to_digits(n), "output": to_words(n)}
    return {"instruction": TO_DIGITS, "input": to_words(n), "output": to_digits(n)}


def build(seed: int, counts: dict[str, int], max_digits: int) -> dict[str, list[dict]]:
    """{split: rows}: test drawn first, then dev, then train, so a larger train split never changes test."""
    if sum(counts.values()) > 10**max_digits // 2:  # sample_numbers would slow down, then never end
        raise ValueError(f"{sum(counts.values())} rows: expected at most half of the numbers of up to {max_digits} digits")
    rng, taken, rows = random.Random(seed), set(), {}
    for split in ("test", "dev", "train"):
        numbers = sample_numbers(rng, counts[split], max_digits, taken)
        rows[split] = [make_row(n, rng.random() < 0.5) for n in numbers]
    return {s: rows[s] for s in SPLITS}


def normalize(text: str) -> str:
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the prediction is the reference (whitespace runs collapsed), else 0.0."""
    return float(normalize(prediction) == normalize(reference))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, required=True, help="study root: task/ is written there")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--dev", type=int, default=200)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--max_digits", type=int, default=12, help="1..12 (words up to the billions)")
    args = p.parse_args(argv)
    if not 1 <= args.max_digits <= 3 * len(SCALES):
        p.error(f"--max_digits {args.max_digits}: expected 1..{3 * len(SCALES)}")
    if args.train + args.dev + args.test > 10 ** args.max_digits // 2:
        p.error(f"{args.train + args.dev + args.test} rows: expected at most half of the {10 ** args.max_digits} numbers "
                f"of up to {args.max_digits} digits")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    counts = {"train": args.train, "dev": args.dev, "test": args.test}
    rows = build(args.seed, counts, args.max_digits)
    out = args.root / "task"
    for s in SPLITS:
        qlib.write_jsonl(out / f"{s}.jsonl", rows[s])
    digits = {s: {} for s in SPLITS}
    for s in SPLITS:
        for r in rows[s]:
            d = len(r["output" if r["instruction"] == TO_DIGITS else "input"].replace(",", ""))
            digits[s][d] = digits[s].get(d, 0) + 1
    manifest = {"task": "numbers", "metric": "exact_match", "seed": args.seed, "max_digits": args.max_digits,
                "instructions": [TO_WORDS, TO_DIGITS], "sha256": {s: sha256_file(out / f"{s}.jsonl") for s in SPLITS},
                **{s: {"rows": len(rows[s]), "to_words": sum(r["instruction"] == TO_WORDS for r in rows[s]),
                       "digits": dict(sorted(digits[s].items()))} for s in SPLITS},
                "seconds": round(time.perf_counter() - t0, 2)}
    qlib.write_json(out / "manifest.json", manifest)
    print(f"numbers task in {out}: " + ", ".join(f"{s} {len(rows[s])} rows" for s in SPLITS) + f" (seed {args.seed})")
    return manifest


if __name__ == "__main__":
    main()
