"""The built-in data set: short instruction examples with one right answer that a tiny model learns fast.

Tasks: reverse a word, write it in capitals, give its first letter, repeat it, sort its letters,
count its letters, add two small numbers, name a country's capital. `python -m moai_jax.data.builtin`
writes `moai_jax/data/default_data/tasks.jsonl`; a test checks that the shipped file matches.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PATH = Path(__file__).parent / "default_data" / "tasks.jsonl"

WORDS = """
apple river stone cloud light green house table chair bread water money music night paper plant
sugar tiger zebra horse mouse snake eagle whale shark lemon mango peach grape melon onion carrot
cat dog sun moon star tree bird fish road ship book pen cup hat box key map egg ice fire rain wind
snow sand gold iron salt milk rice corn seed leaf rock lake hill farm town city door wall roof
garden window market forest island planet rocket silver bottle candle pencil basket ladder mirror
""".split()

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "Korea": "Seoul", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Peru": "Lima", "Chile": "Santiago", "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia",
    "Russia": "Moscow", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw",
    "Greece": "Athens", "Turkey": "Ankara", "Iran": "Tehran", "Iraq": "Baghdad", "Cuba": "Havana",
    "Ireland": "Dublin", "Portugal": "Lisbon", "Austria": "Vienna", "Hungary": "Budapest", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Australia": "Canberra", "Argentina": "Buenos Aires", "Denmark": "Copenhagen",
}

TASKS = {
    "Reverse the word.": lambda rng: (w := rng.choice(WORDS), w[::-1]),
    "Write the word in capital letters.": lambda rng: (w := rng.choice(WORDS), w.upper()),
    "What is the first letter of the word?": lambda rng: (w := rng.choice(WORDS), w[0]),
    "Repeat the word twice.": lambda rng: (w := rng.choice(WORDS), f"{w} {w}"),
    "Sort the letters of the word.": lambda rng: (w := rng.choice(WORDS), "".join(sorted(w))),
    "How many letters does the word have?": lambda rng: (w := rng.choice(WORDS), str(len(w))),
    "Add the numbers.": lambda rng: (f"{(a := rng.randrange(50))} + {(b := rng.randrange(50))}", str(a + b)),
    "What is the capital of the country?": lambda rng: (c := rng.choice(sorted(CAPITALS)), CAPITALS[c]),
}


def builtin_examples(count: int = 3000, seed: int = 0) -> list[dict[str, str]]:
    """`count` examples with `instruction`, `input` and `output`, the same for a seed."""
    rng = random.Random(seed)
    instructions = list(TASKS)
    examples = []
    for _ in range(count):
        instruction = rng.choice(instructions)
        input, output = TASKS[instruction](rng)
        examples.append({"instruction": instruction, "input": input, "output": output})
    return examples


def to_jsonl(examples: list[dict[str, str]]) -> str:
    return "".join(json.dumps(e) + "\n" for e in examples)


if __name__ == "__main__":
    PATH.parent.mkdir(exist_ok=True)
    PATH.write_text(to_jsonl(builtin_examples()))
    print(f"wrote {PATH}")
