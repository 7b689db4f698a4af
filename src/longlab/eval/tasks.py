"""Evaluation tasks as small validated dataclasses, with the same spec syntax as methods
(``passkey:digits=7``, ``niah:depths=7``, ``ruler:subtasks=niah_single_1;vt``, ``jsonl:path=x.jsonl``).

A task expands into one or more *subtasks* (the ``task`` column of the results: ``passkey``,
``niah``, ``ruler/vt``, ...), and produces, for a subtask and a length, the deterministic list of
samples of that cell. Generation tasks score each output 0-100; ``ppl`` measures losses instead.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from longlab.data import synthetic
from longlab.data.haystack import filler
from longlab.data.synthetic import Sample, fit
from longlab.errors import SpecError
from longlab.eval import ruler
from longlab.eval.generation import encode, generate_answers, held_out_tokens, perplexity_sample
from longlab.eval.metrics import DATASET_METRIC, METRICS, best_over_references
from longlab.eval.scoring import first_integer_matches, string_match_all
from longlab.method import check_range, field_types
from longlab.spec import closest, convert, split_part

TASKS: dict[str, type[Task]] = {}


def register(cls):
    TASKS[cls.name] = cls
    return cls


def _seed(*parts: object) -> int:
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

    def cell_size(self, count: int) -> int:
        """Samples in one (subtask, length) cell for ``count`` samples asked."""
        return count

    def measure(self, cell: CellContext, todo: list[int]) -> Iterator[tuple[list[int], list[dict]]]:
        """Measure samples ``todo`` of a cell, a batch at a time: yields (sample indices, their rows).
        The runner times each batch and records its rows. Generation tasks: greedy answers, scored."""
        for start in range(0, len(todo), cell.batch_size):
            batch = todo[start : start + cell.batch_size]
            prompts = [encode(cell.tokenizer, cell.samples[i].prompt, cell.chat) for i in batch]
            answers = generate_answers(cell.model, cell.tokenizer, prompts, self.new_tokens(cell.subtask))
            rows = []
            for i, prompt, answer in zip(batch, prompts, answers, strict=True):
                sample = cell.samples[i]
                rows.append({
                    "depth": sample.meta.get("depth"), "prompt_tokens": prompt.shape[1], "expected": sample.answers,
                    "predicted": answer, "score": self.score(cell.subtask, answer, sample),
                })  # fmt: skip
            yield batch, rows


@register
@dataclass(frozen=True)
class Passkey(Task):
    """Passkey retrieval in the Landmark Attention format (Mohtashami & Jaggi, 2023): a key of
    ``digits`` digits hidden in filler; score 100 when the first integer of the answer is the key.
    ``depths=0`` draws the needle position uniformly; ``depths=N`` cycles through an N-point grid."""

    name = "passkey"
    max_new_tokens = 10
    digits: int = 5
    depths: int = 0

    def __post_init__(self) -> None:
        check_range(self.name, "digits", self.digits, low=1, high=30, integer=True)
        check_range(self.name, "depths", self.depths, low=0, integer=True)

    def samples(self, subtask, tokenizer, length, count, seed):
        rng = random.Random(_seed(seed, subtask, length))
        grid = [i / (self.depths - 1) if self.depths > 1 else 0.5 for i in range(self.depths)] if self.depths else None
        return [
            synthetic.passkey(
                tokenizer, length, rng, self.digits, grid[i % len(grid)] if grid else None, self.max_new_tokens
            )
            for i in range(count)
        ]

    def score(self, subtask, output, sample):
        return 100 * first_integer_matches(output, sample.answers[0])


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

    def cell_size(self, count: int) -> int:
        return count * len(self.depth_grid())

    def depth_grid(self) -> list[float]:
        return [i / (self.depths - 1) for i in range(self.depths)] if self.depths > 1 else [0.5]

    def samples(self, subtask, tokenizer, length, count, seed):
        out = []
        for repeat in range(count):
            start = random.Random(_seed(seed, subtask, length, repeat)).randrange(10**6)
            for depth in self.depth_grid():

                def build(n: int, depth=depth, start=start) -> str:
                    units = filler("prose", n, start, self.haystack)
                    at = round(n * depth)
                    context = " ".join([*units[:at], self.needle, *units[at:]])
                    return f"{context}\n\nQuestion: {self.question}\nAnswer: {self.answer_prefix}"

                prompt, _ = fit(tokenizer, build, length - self.max_new_tokens)
                out.append(Sample(prompt, [self.answer], {"task": "niah", "length": length, "depth": depth}))
        return out

    def score(self, subtask, output, sample):
        return string_match_all(output, sample.answers)


@register
@dataclass(frozen=True)
class Ruler(Task):
    """RULER's synthetic tasks (Hsieh et al., 2024) that need no downloaded data; ``subtasks`` is
    ``all`` or a ``;``-separated list. ``haystack`` replaces the prose haystack with a folder of
    .txt files."""

    name = "ruler"
    max_new_tokens = 64
    default_samples = 5
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
        rng = random.Random(_seed(seed, subtask, length))
        name = subtask.split("/", 1)[1]
        return [ruler.sample(name, tokenizer, length, rng, self.haystack, self.max_new_tokens) for _ in range(count)]

    def score(self, subtask, output, sample):
        return string_match_all(output, sample.answers)


@register
@dataclass(frozen=True)
class Perplexity(Task):
    """Perplexity of held-out text (the test split of ``longlab corpus``, never trained on) at each
    length: whole-window (every position of a ``length``-token window) and sliding-window (a
    ``2 x length`` span read in windows of ``length`` advancing by ``stride``, each token scored once,
    as in Press et al., 2022), plus the per-position loss curve of the whole window."""

    name = "ppl"
    kind = "perplexity"
    default_samples = 2
    stride_fraction: float = 0.25

    def __post_init__(self) -> None:
        check_range(self.name, "stride_fraction", self.stride_fraction, low=0, high=1, low_open=True)

    def measure(self, cell: CellContext, todo: list[int]) -> Iterator[tuple[list[int], list[dict]]]:
        tokens = cell.held_out.tokens()
        for i in todo:
            yield [i], [perplexity_sample(cell.model, tokens, cell.length, i, cell.count, self.stride_fraction)]


@register
@dataclass(frozen=True)
class Jsonl(Task):
    """Any LongBench-format file (fields input, context, answers, all_classes). The metric follows
    LongBench's choice for the dataset named by the file (or ``metric=``); the context is cut in the
    middle to fit the length, as LongBench does."""

    name = "jsonl"
    max_new_tokens = 64
    default_samples = 20
    path: str = ""
    metric: str | None = None
    template: str = "{context}\n\nQuestion: {input}\nAnswer:"
    new_tokens_: int = dataclasses.field(default=64, metadata={"spec_name": "max_new_tokens"})

    def __post_init__(self) -> None:
        if not Path(self.path).is_file():
            raise SpecError(f"jsonl: parameter 'path' must be a LongBench-format .jsonl file, got {self.path!r}")
        if self.metric is not None and self.metric not in METRICS:
            raise SpecError(f"jsonl: parameter 'metric' must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if "{context}" not in self.template:
            raise SpecError("jsonl: parameter 'template' must contain {context}")

    def subtasks(self):
        return [f"jsonl/{Path(self.path).stem}"]

    def new_tokens(self, subtask: str) -> int:
        return self.new_tokens_

    def chosen_metric(self) -> str:
        return self.metric or DATASET_METRIC.get(Path(self.path).stem.removesuffix("_e"), "qa_f1")

    def samples(self, subtask, tokenizer, length, count, seed):
        rows = [json.loads(line) for line in Path(self.path).read_text().splitlines() if line.strip()]
        out = []
        for row in rows[:count]:
            context_ids = tokenizer(row["context"], add_special_tokens=False)["input_ids"]
            empty = self.template.format(context="", input=row.get("input", ""))
            budget = length - self.new_tokens_ - len(tokenizer(empty, add_special_tokens=False)["input_ids"])
            if budget < 0:
                raise SpecError(f"jsonl: length {length} cannot hold the template and {self.new_tokens_} new tokens")
            if len(context_ids) > budget:  # keep the beginning and the end, as LongBench truncates
                half = budget // 2
                context_ids = context_ids[:half] + context_ids[len(context_ids) - (budget - half) :]
            context = tokenizer.decode(context_ids)
            prompt = self.template.format(context=context, input=row.get("input", ""))
            meta = {"task": subtask, "length": length, "all_classes": row.get("all_classes")}
            out.append(Sample(prompt, list(row["answers"]), meta))
        return out

    def score(self, subtask, output, sample):
        metric = self.chosen_metric()
        first_line = output.lstrip("\n").split("\n")[0] if metric != "code_similarity" else output
        return 100 * best_over_references(metric, first_line, sample.answers, sample.meta.get("all_classes"))


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
    if cls is Jsonl and "path" not in values:
        raise SpecError("task 'jsonl' needs parameter path (e.g. 'jsonl:path=data/qasper.jsonl')")
    return cls(**values)


def describe_tasks() -> list[dict]:
    rows = []
    for name, cls in TASKS.items():
        params = {spec: cls.__dataclass_fields__[field].default for spec, field in task_fields(cls).items()}
        summary = " ".join((cls.__doc__ or "").split())
        rows.append({"name": name, "kind": cls.kind, "parameters": params, "summary": summary})
    return rows
