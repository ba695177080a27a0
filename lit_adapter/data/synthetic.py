"""The built-in instruction set: simple, learnable tasks generated from a seed (the quickstart's data).

Reverse a word, add two numbers, sort numbers, name a letter's capital, ...; some records have an input. A model
that learns them shows the whole pipeline works, with no download: ``--source synthetic`` in the prepare scripts.
"""

from __future__ import annotations

import dataclasses
import random
from typing import List

from lit_adapter.errors import UserError
from lit_adapter.data.prompts import InstructionRecord

SYNTHETIC_DEFAULT_SIZE = 5000

_WORDS = (
    "apple", "river", "garden", "pencil", "window", "rocket", "candle", "forest", "yellow", "planet", "silver",
    "button", "castle", "dragon", "engine", "flower", "guitar", "harbor", "island", "jacket", "kitten", "ladder",
    "marble", "needle", "orange", "pepper", "rabbit", "saddle", "tomato", "violin", "wallet", "zipper", "bridge",
    "cloud", "stone", "tiger", "lemon", "bread", "chair", "music", "ocean", "piano", "queen", "robot", "sugar",
    "train", "water", "house", "light", "green",
)


def _reverse(rng: random.Random) -> InstructionRecord:
    word = rng.choice(_WORDS)
    return InstructionRecord(f"Reverse the word {word}.", "", word[::-1])


def _add(rng: random.Random) -> InstructionRecord:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return InstructionRecord(f"Add {a} and {b}.", "", str(a + b))


def _repeat(rng: random.Random) -> InstructionRecord:
    word = rng.choice(_WORDS)
    return InstructionRecord(f"Repeat the word {word} three times.", "", " ".join([word] * 3))


def _capital(rng: random.Random) -> InstructionRecord:
    letter = chr(ord("a") + rng.randrange(26))
    return InstructionRecord(f"What is the capital letter of {letter}?", "", letter.upper())


def _uppercase(rng: random.Random) -> InstructionRecord:
    word = rng.choice(_WORDS)
    return InstructionRecord("Write the input word in capital letters.", word, word.upper())


def _sort(rng: random.Random) -> InstructionRecord:
    numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 5))]
    return InstructionRecord(
        "Sort the numbers in ascending order.", ", ".join(map(str, numbers)), ", ".join(map(str, sorted(numbers)))
    )


def _count(rng: random.Random) -> InstructionRecord:
    word = rng.choice(_WORDS)
    return InstructionRecord("How many letters does the input word have?", word, str(len(word)))


def _parity(rng: random.Random) -> InstructionRecord:
    n = rng.randint(0, 999)
    return InstructionRecord(f"Is {n} even or odd?", "", "even" if n % 2 == 0 else "odd")


def _first_letter(rng: random.Random) -> InstructionRecord:
    word = rng.choice(_WORDS)
    return InstructionRecord("What is the first letter of the input word?", word, word[0])


_SYNTHETIC_TASKS = (_reverse, _add, _repeat, _capital, _uppercase, _sort, _count, _parity, _first_letter)


def synthetic_instructions(n: int = SYNTHETIC_DEFAULT_SIZE, seed: int = 0) -> List[InstructionRecord]:
    """``n`` programmatically generated instruction records of simple, learnable tasks (reverse a word, add two
    numbers, sort numbers, ...), some with an input; the built-in dataset of the quickstart. Deterministic in
    ``seed``."""
    if n < 1:
        raise UserError(f"the number of synthetic records must be at least 1, got {n}")
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        task = rng.choice(_SYNTHETIC_TASKS)
        # the task is the record's category, so the per-category views have something to show on this data too
        records.append(dataclasses.replace(task(rng), category=task.__name__.lstrip("_")))
    return records
