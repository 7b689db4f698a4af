"""RULER's synthetic tasks."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from longlab.errors import SpecError
from longlab.eval import ruler
from longlab.eval.tasks.base import Task, register, stable_seed


@register
@dataclass(frozen=True)
class Ruler(Task):
    """RULER's synthetic tasks (Hsieh et al., 2024) that need no downloaded data, in RULER's format:
    its templates, in-context examples, generation budgets (niah 128, vt 30, cwe 120, fwe 50 tokens,
    not cut at a newline) and scores (string_match_all after RULER's postprocess). ``subtasks`` is
    ``all`` or a ``;``-separated list. ``haystack`` replaces the prose haystack with a folder of
    .txt files."""

    name = "ruler"
    max_new_tokens = 128  # the largest of RULER's budgets; new_tokens() gives each subtask its own
    default_samples = 5
    selectors = ("subtasks",)  # which subtasks run; each subtask's results do not depend on it
    subtasks_: str = dataclasses.field(default="all", metadata={"spec_name": "subtasks"})
    haystack: str | None = None

    def __post_init__(self) -> None:
        unknown = [s for s in self._names() if s not in ruler.TASKS]
        if unknown:
            raise SpecError(f"ruler: unknown subtask(s) {unknown}; known: {', '.join(ruler.TASKS)}")

    def _names(self) -> list[str]:
        return list(ruler.TASKS) if self.subtasks_ == "all" else [s for s in self.subtasks_.split(";") if s]

    def subtasks(self):
        return [f"ruler/{s}" for s in self._names()]

    def new_tokens(self, subtask):
        return ruler.tokens_to_generate(subtask.split("/", 1)[1])

    def first_line(self, subtask):
        return False  # RULER generates to its budget and scores the whole answer

    def samples(self, subtask, tokenizer, length, count, seed):
        rng = random.Random(stable_seed(seed, subtask, length))
        name, budget = subtask.split("/", 1)[1], self.new_tokens(subtask)
        return [ruler.sample(name, tokenizer, length, rng, self.haystack, budget) for _ in range(count)]

    def score(self, subtask, output, sample):
        return ruler.score(subtask.split("/", 1)[1], output, sample.answers)
