"""Write a small LongBench-format QA file for the context-method comparison (docs/context.md): each row
hides one made-up fact in the prose haystack at a seeded depth and asks for it (fields context,
input, answers; the generic ``jsonl`` prompt and qa_f1 score it).

    python benchmarks/context_qa.py --out runs/context_qa.jsonl --rows 8 --sentences 700
"""

from __future__ import annotations

import argparse
import json
import random

from longlab.data.haystack import filler

PEOPLE = ["Maria", "Tomas", "Aiko", "Kwame", "Lena", "Ravi", "Sofia", "Omar", "Ines", "Pavel"]
THINGS = [
    ("soup", "secret ingredient", ["smoked paprika", "black garlic", "dried lime", "star anise"]),
    ("boat", "name", ["Silver Heron", "Blue Lantern", "Quiet Storm", "Morning Tide"]),
    ("garden", "rarest flower", ["ghost orchid", "jade vine", "corpse lily", "black bat flower"]),
    ("bicycle", "colour", ["copper green", "ochre yellow", "plum violet", "slate blue"]),
]


def row(rng: random.Random, sentences: int) -> dict:
    person, (thing, attribute, values) = rng.choice(PEOPLE), rng.choice(THINGS)
    value = rng.choice(values)
    fact = f"The {attribute} of {person}'s {thing} is {value}."
    units = filler("prose", sentences, rng.randrange(10**6))
    at = rng.randrange(len(units) + 1)
    context = " ".join([*units[:at], fact, *units[at:]])
    return {"context": context, "input": f"What is the {attribute} of {person}'s {thing}?", "answers": [value],
            "depth": round(at / max(len(units), 1), 3)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/context_qa.jsonl")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--sentences", type=int, default=700, help="haystack sentences per row (~15 tokens each)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with open(args.out, "w", encoding="utf-8") as f:
        for _ in range(args.rows):
            f.write(json.dumps(row(rng, args.sentences)) + "\n")
    print(f"wrote {args.rows} rows to {args.out}")


if __name__ == "__main__":
    main()
