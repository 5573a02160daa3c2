"""Regenerate the tiny datasets shipped with kasa_trl: ``python kasa_trl/data/make_data.py`` (or ``python -m kasa_trl.data.make_data``).

The output is deterministic (fixed seed, fixed fact tables), so re-running it rewrites identical files.
Facts are short and templated so that a 64-wide, 2-layer model visibly learns them in a few hundred steps.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SYSTEM_PROMPT = "You are a helpful assistant. Answer in one short sentence."

COLOURS = {
    "the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow", "a tomato": "red",
    "coal": "black", "a carrot": "orange", "a lemon": "yellow", "a cherry": "red", "a leaf": "green",
    "milk": "white", "the night": "black", "the sea": "blue", "chocolate": "brown", "a strawberry": "red",
    "a pumpkin": "orange", "a frog": "green", "a crow": "black", "a cloud": "white", "soil": "brown",
}  # fmt: skip
SOUNDS = {
    "a cow": "moo", "a dog": "woof", "a cat": "meow", "a duck": "quack", "a sheep": "baa", "a pig": "oink",
    "a horse": "neigh", "an owl": "hoot", "a lion": "roar", "a bee": "buzz", "a frog": "croak",
    "a snake": "hiss", "a mouse": "squeak", "a goat": "bleat",
}  # fmt: skip
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "Egypt": "Cairo", "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
    "Greece": "Athens", "Portugal": "Lisbon", "Austria": "Vienna", "Poland": "Warsaw", "Ireland": "Dublin",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Russia": "Moscow",
    "China": "Beijing", "India": "Delhi", "Chile": "Santiago", "Cuba": "Havana", "Hungary": "Budapest",
    "Belgium": "Brussels",
}  # fmt: skip
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "day": "night", "happy": "sad",
    "old": "new", "open": "closed", "light": "dark", "wet": "dry", "full": "empty", "early": "late",
    "hard": "soft", "long": "short", "rich": "poor", "loud": "quiet", "left": "right", "in": "out",
    "high": "low", "strong": "weak",
}  # fmt: skip


def sft_pairs(rng: random.Random) -> list[tuple[str, str]]:
    """(question, answer) pairs for supervised fine-tuning."""
    sums = rng.sample([(a, b) for a in range(10) for b in range(10)], 60)
    pairs = [(f"What is {a} + {b}?", f"{a} + {b} = {a + b}.") for a, b in sums]
    for thing, colour in COLOURS.items():
        pairs.append((f"What colour is {thing}?", f"{thing.capitalize()} is {colour}."))
        pairs.append((f"Tell me the colour of {thing}.", f"The colour of {thing} is {colour}."))
    for animal, sound in SOUNDS.items():
        pairs.append((f"What sound does {animal} make?", f"{animal.capitalize()} says {sound}."))
        pairs.append((f"How does {animal} sound?", f"{animal.capitalize()} says {sound}."))
    for country, city in CAPITALS.items():
        pairs.append((f"What is the capital of {country}?", f"The capital of {country} is {city}."))
        pairs.append((f"Which city is the capital of {country}?", f"{city} is the capital of {country}."))
    for word, opposite in OPPOSITES.items():
        pairs.append((f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}."))
    return pairs


def sft_rows(rng: random.Random) -> list[dict[str, Any]]:
    """Conversational rows; every 10th has a system prompt, every 25th is two turns long."""
    pairs = sft_pairs(rng)
    rng.shuffle(pairs)
    rows = []
    for i, (question, answer) in enumerate(pairs):
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if i % 25 == 24:
            follow_q, follow_a = pairs[(i + 1) % len(pairs)]
            messages += [{"role": "user", "content": follow_q}, {"role": "assistant", "content": follow_a}]
        if i % 10 == 0:
            messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
        rows.append({"messages": messages})
    return rows


def dpo_rows(rng: random.Random) -> list[dict[str, Any]]:
    """Preference rows: ``chosen`` states the fact, ``rejected`` the same sentence with a wrong fact."""
    rows = []
    for a, b in rng.sample([(a, b) for a in range(10) for b in range(10)], 40):
        wrong = a + b + rng.choice([-2, -1, 1, 2, 3])
        wrong = wrong if wrong >= 0 else a + b + 1
        rows.append(
            {
                "prompt": f"What is {a} + {b}?",
                "chosen": f"{a} + {b} = {a + b}.",
                "rejected": f"{a} + {b} = {wrong}.",
            }
        )
    tables = [
        (CAPITALS, "What is the capital of {k}?", "The capital of {k} is {v}."),
        (COLOURS, "What colour is {k}?", "{K} is {v}."),
        (SOUNDS, "What sound does {k} make?", "{K} says {v}."),
    ]
    for table, prompt, answer in tables:
        values = sorted(set(table.values()))
        for key, value in table.items():
            wrong_value = rng.choice([v for v in values if v != value])
            fill = {"k": key, "K": key.capitalize()}
            rows.append(
                {
                    "prompt": prompt.format(**fill),
                    "chosen": answer.format(v=value, **fill),
                    "rejected": answer.format(v=wrong_value, **fill),
                }
            )
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=True) + "\n")


def main() -> None:
    write_jsonl(HERE / "sft.jsonl", sft_rows(random.Random(0)))
    write_jsonl(HERE / "dpo.jsonl", dpo_rows(random.Random(1)))


if __name__ == "__main__":
    main()
