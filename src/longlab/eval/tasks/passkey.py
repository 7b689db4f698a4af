"""Passkey retrieval."""

from __future__ import annotations

import random
from dataclasses import dataclass

from longlab.data import synthetic
from longlab.eval.scoring import first_integer_matches
from longlab.eval.tasks.base import Task, register, stable_seed
from longlab.method import check_range


@register
@dataclass(frozen=True)
class Passkey(Task):
    """Passkey retrieval in the Landmark Attention format (Mohtashami & Jaggi, 2023): a key hidden in
    filler -- Landmark's random integer 1-50000, or one of exactly ``digits`` digits; score 100 when
    the first integer of the whole generation (10 tokens, not cut at a newline) equals the key as an
    integer. ``depths=0`` draws the needle position uniformly; ``depths=N`` cycles through an N-point
    grid."""

    name = "passkey"
    max_new_tokens = 10  # Landmark's budget
    digits: int | None = None
    depths: int = 0

    def __post_init__(self) -> None:
        check_range(self.name, "digits", self.digits, low=1, high=30, integer=True)
        check_range(self.name, "depths", self.depths, low=0, integer=True)

    def new_tokens(self, subtask):
        # room for every digit of a long key even where a tokenizer splits digits one per token
        return max(self.max_new_tokens, (self.digits or 0) + 2)

    def first_line(self, subtask):
        return False  # Landmark reads the first integer anywhere in its 10 generated tokens

    def samples(self, subtask, tokenizer, length, count, seed):
        rng = random.Random(stable_seed(seed, subtask, length))
        grid = [i / (self.depths - 1) if self.depths > 1 else 0.5 for i in range(self.depths)] if self.depths else None
        budget = self.new_tokens(subtask)
        return [
            synthetic.passkey(tokenizer, length, rng, self.digits, grid[i % len(grid)] if grid else None, budget)
            for i in range(count)
        ]

    def score(self, subtask, output, sample):
        return 100 * first_integer_matches(output, sample.answers[0])
