"""The task interface: a validated dataclass that expands into subtasks, builds the deterministic
samples of a (subtask, length) cell and measures them; the registry and the spec parser."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from longlab.data.synthetic import Sample
from longlab.errors import SpecError
from longlab.eval.generation import encode, generate_answers, held_out_tokens
from longlab.method import field_types
from longlab.spec import closest, convert, split_part

TASKS: dict[str, type[Task]] = {}


def register(cls):
    TASKS[cls.name] = cls
    return cls


def stable_seed(*parts: object) -> int:
    """A stable seed from the cell's identity (Python's hash() of str is salted per process)."""
    text = "/".join(map(str, parts))
    return sum((i + 1) * ord(c) for i, c in enumerate(text)) * 1_000_003 % (2**61 - 1)


class HeldOut:
    """The held-out test text as tokens, read on first use (only perplexity needs it)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self._tokens = tokenizer, None

    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = held_out_tokens(self.tokenizer)
        return self._tokens


@dataclass
class CellContext:
    """What a task needs to measure the samples of one (subtask, length) cell."""

    model: Any
    tokenizer: Any
    subtask: str
    length: int
    count: int
    samples: list[Sample] | None  # generation prompts, built before any work
    chat: bool
    batch_size: int
    held_out: HeldOut


@dataclass(frozen=True)
class Task:
    name: ClassVar[str] = ""
    kind: ClassVar[str] = "generation"  # or "perplexity"
    max_new_tokens: ClassVar[int] = 16
    default_samples: ClassVar[int] = 10  # per (subtask, length) cell; per depth for niah

    def subtasks(self) -> list[str]:
        return [self.name]

    def samples(self, subtask: str, tokenizer, length: int, count: int, seed: int) -> list[Sample]:
        raise NotImplementedError

    def score(self, subtask: str, output: str, sample: Sample) -> float:
        raise NotImplementedError

    def new_tokens(self, subtask: str) -> int:
        return self.max_new_tokens

    def first_line(self, subtask: str) -> bool:
        """Whether generation stops at the answer's first newline (else it runs to its budget)."""
        return True

    def uses_chat(self, subtask: str) -> bool:
        """Whether ``--chat`` wraps this subtask's prompts in the chat template (some formats opt out)."""
        return True

    def cell_size(self, count: int) -> int:
        """Samples in one (subtask, length) cell for ``count`` samples asked."""
        return count

    def measure(self, cell: CellContext, todo: list[int]) -> Iterator[tuple[list[int], list[dict]]]:
        """Measure samples ``todo`` of a cell, a batch at a time: yields (sample indices, their rows).
        The runner times each batch and records its rows. Generation tasks: greedy answers, scored."""
        for start in range(0, len(todo), cell.batch_size):
            batch = todo[start : start + cell.batch_size]
            chat = cell.chat and self.uses_chat(cell.subtask)
            prompts = [encode(cell.tokenizer, cell.samples[i].prompt, chat) for i in batch]
            answers = generate_answers(
                cell.model, cell.tokenizer, prompts, self.new_tokens(cell.subtask), self.first_line(cell.subtask)
            )
            rows = []
            for i, prompt, answer in zip(batch, prompts, answers, strict=True):
                sample = cell.samples[i]
                rows.append({
                    "depth": sample.meta.get("depth"), "prompt_tokens": prompt.shape[1], "expected": sample.answers,
                    "predicted": answer, "score": self.score(cell.subtask, answer, sample),
                })  # fmt: skip
            yield batch, rows


def task_fields(cls: type[Task]) -> dict[str, str]:
    """Spec names of a task's parameters -> dataclass field names."""
    return {f.metadata.get("spec_name", f.name): f.name for f in dataclasses.fields(cls)}


def parse_task(spec: str) -> Task:
    name, params = split_part(spec)
    if name not in TASKS:
        raise SpecError(f"unknown task {name!r}{closest(name, list(TASKS))} Known tasks: {', '.join(TASKS)}")
    cls = TASKS[name]
    names, types_ = task_fields(cls), field_types(cls)
    values: dict[str, Any] = {}
    for key, text in params.items():
        if key not in names:
            raise SpecError(f"task {name!r} has no parameter {key!r}{closest(key, list(names))} "
                            f"Its parameters: {', '.join(names) or 'none'}")  # fmt: skip
        values[names[key]] = convert(name, key, types_[names[key]], text)
    return cls(**values)


def describe_tasks() -> list[dict]:
    rows = []
    for name, cls in TASKS.items():
        params = {spec: cls.__dataclass_fields__[field].default for spec, field in task_fields(cls).items()}
        summary = " ".join((cls.__doc__ or "").split())
        rows.append({"name": name, "kind": cls.kind, "parameters": params, "summary": summary})
    return rows
