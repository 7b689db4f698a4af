"""RULER's synthetic tasks."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from longlab.errors import SpecError
from longlab.eval import ruler
from longlab.eval.scoring import string_match_all
from longlab.eval.tasks.base import Task, register, stable_seed


@register
@dataclass(frozen=True)
class Ruler(Task):
    """RULER's synthetic tasks (Hsieh et al., 2024) that need no downloaded data; ``subtasks`` is
    ``all`` or a ``;``-separated list. ``haystack`` replaces the prose haystack with a folder of
    .txt files."""

    name = "ruler"
    max_new_tokens = 64
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

    def samples(self, subtask, tokenizer, length, count, seed):
        rng = random.Random(stable_seed(seed, subtask, length))
        name = subtask.split("/", 1)[1]
        return [ruler.sample(name, tokenizer, length, rng, self.haystack, self.max_new_tokens) for _ in range(count)]

    def score(self, subtask, output, sample):
        return string_match_all(output, sample.answers)
