"""Needle in a haystack."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from longlab.data.haystack import filler, prose_sentences
from longlab.data.synthetic import Sample, fit, split_prompt
from longlab.errors import LonglabError, SpecError
from longlab.eval.scoring import string_match_all
from longlab.eval.tasks.base import Task, register, stable_seed
from longlab.method import check_range

DEFAULT_NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
DEFAULT_QUESTION = "What is the best thing to do in San Francisco?"
DEFAULT_PREFIX = "The best thing to do in San Francisco is"
DEFAULT_ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day"


@register
@dataclass(frozen=True)
class NeedleInAHaystack(Task):
    """Needle in a haystack (Kamradt, 2023) over a depth x length grid on a prose haystack -- by
    default the reference manual that ships with Python. Score: 100 when the needle's answer appears
    in the output (case-insensitive), no LLM judge. ``count`` samples are taken at each depth."""

    name = "niah"
    max_new_tokens = 24
    default_samples = 1
    depths: int = 5
    needle: str = DEFAULT_NEEDLE
    question: str = DEFAULT_QUESTION
    answer_prefix: str = DEFAULT_PREFIX
    answer: str = DEFAULT_ANSWER
    haystack: str | None = None

    def __post_init__(self) -> None:
        check_range(self.name, "depths", self.depths, low=1, integer=True)
        if self.haystack is not None and not Path(self.haystack).is_dir():
            raise SpecError(f"niah: parameter 'haystack' must be a folder of .txt files, got {self.haystack!r}")
        if self.haystack is not None:
            try:
                prose_sentences(self.haystack)  # an empty folder fails here, when the spec is parsed
            except LonglabError as error:
                raise SpecError(f"niah: {error}") from None

    def cell_size(self, count: int) -> int:
        return count * len(self.depth_grid())

    def depth_grid(self) -> list[float]:
        return [i / (self.depths - 1) for i in range(self.depths)] if self.depths > 1 else [0.5]

    def samples(self, subtask, tokenizer, length, count, seed):
        out = []
        for repeat in range(count):
            start = random.Random(stable_seed(seed, subtask, length, repeat)).randrange(10**6)
            for depth in self.depth_grid():

                def build(n: int, depth=depth, start=start) -> str:
                    units = filler("prose", n, start, self.haystack)
                    at = round(n * depth)
                    context = " ".join([*units[:at], self.needle, *units[at:]])
                    return f"{context}\n\nQuestion: {self.question}\nAnswer: {self.answer_prefix}"

                prompt, _ = fit(tokenizer, build, length - self.max_new_tokens)
                tail = f"\n\nQuestion: {self.question}\nAnswer: {self.answer_prefix}"
                meta = {"task": "niah", "length": length, "depth": depth}
                out.append(Sample(prompt, [self.answer], meta, split_prompt(prompt, "", tail)))
        return out

    def score(self, subtask, output, sample):
        return string_match_all(output, sample.answers)
