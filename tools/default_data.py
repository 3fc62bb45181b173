"""The synthetic data of the shipped default assets (msplora_dist/assets/data/): alpaca, chat and plain-text
rows built from small templates and tables, seeded. Written by tools/make_default_assets.py."""

from __future__ import annotations

import random

N_INSTRUCTIONS = 500
N_CHAT = 100
N_TEXT = 100

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

