"""The task interface: a validated dataclass that expands into subtasks, builds the deterministic
samples of a (subtask, length) cell and measures them; the registry and the spec parser."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from longlab.context.base import ContextMethod, ContextQuery
from longlab.data.synthetic import Sample
from longlab.errors import LonglabError, SpecError
from longlab.eval.generation import held_out_tokens
from longlab.generation import encode, generate_answers
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
    seed: int = 0
    context: ContextMethod | None = None  # the composition's context method: it answers instead


@dataclass(frozen=True)
class Task:
    name: ClassVar[str] = ""
    kind: ClassVar[str] = "generation"  # or "perplexity"
    max_new_tokens: ClassVar[int] = 16
    default_samples: ClassVar[int] = 10  # per (subtask, length) cell; per depth for niah
    # parameters that only choose which subtasks run (ruler's ``subtasks``): no part of a result's identity
    selectors: ClassVar[tuple[str, ...]] = ()
    # parameters that change results but are named by the subtask already (jsonl's path: jsonl/qasper)
    unlabelled: ClassVar[tuple[str, ...]] = ()

    def params(self) -> dict[str, Any]:
        """Parameters that differ from their defaults, by spec name, in declaration order."""
        out = {}
        for spec_name, field_name in task_fields(type(self)).items():
            value, default = getattr(self, field_name), type(self).__dataclass_fields__[field_name].default
            if value != default:
                out[spec_name] = value
        return out

    def spec(self) -> str:
        """The canonical spec string: the name and every non-default parameter (``passkey:digits=7``)."""
        params = ",".join(f"{k}={_format(v)}" for k, v in self.params().items())
        return f"{self.name}:{params}" if params else self.name

    def identity(self) -> str:
        """The spec without its selectors: everything about the task that changes a result."""
        params = {k: v for k, v in self.params().items() if k not in self.selectors}
        return f"{self.name}:{','.join(f'{k}={_format(v)}' for k, v in params.items())}" if params else self.name

    def label(self) -> str:
        """The task's name in results and reports: ``passkey``, or ``passkey[digits=7]`` with the
        parameters that change a result, so two parameterisations in one run stay apart. Long values
        are shortened with a digest of the whole value, so labels stay distinct."""
        hidden = self.selectors + self.unlabelled
        params = {k: v for k, v in self.params().items() if k not in hidden}
        if not params:
            return self.name
        return f"{self.name}[{','.join(f'{k}={_short(_format(v))}' for k, v in params.items())}]"

    def labelled(self, subtask: str) -> str:
        """A subtask's label (the ``task`` column): ``ruler/vt`` -> ``ruler[haystack=DIR]/vt``."""
        return self.label() + subtask[len(self.name) :] if subtask.startswith(self.name) else subtask

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

    def query(self, subtask: str, sample: Sample) -> ContextQuery:
        """A sample's prompt split for a context method; a clear error where the task gives no split."""
        if sample.parts is None:
            raise LonglabError(
                f"task {self.labelled(subtask)!r} gives no question apart from its context for this sample "
                f"(line {sample.meta.get('line', '?')}), which a context method needs: its prompt cannot be split "
                "into instruction, context and question (a LongBench prompt cut into its question does this)"
            )
        return ContextQuery(*sample.parts)

    def measure(self, cell: CellContext, todo: list[int]) -> Iterator[tuple[list[int], list[dict]]]:
        """Measure samples ``todo`` of a cell, a batch at a time: yields (sample indices, their rows).
        The runner times each batch and records its rows. Generation tasks: greedy answers, scored --
        by the cell's context method from the split prompts when the composition has one."""
        for start in range(0, len(todo), cell.batch_size):
            batch = todo[start : start + cell.batch_size]
            chat = cell.chat and self.uses_chat(cell.subtask)
            prompts = [encode(cell.tokenizer, cell.samples[i].prompt, chat) for i in batch]
            new_tokens, first_line = self.new_tokens(cell.subtask), self.first_line(cell.subtask)
            if cell.context is not None:
                queries = [self.query(cell.subtask, cell.samples[i]) for i in batch]
                chat_flag = {"chat": True} if chat else {}  # methods without chat support still run plain
                answers = cell.context.answer(cell.model, cell.tokenizer, queries, new_tokens, first_line, **chat_flag)
            else:
                answers = generate_answers(cell.model, cell.tokenizer, prompts, new_tokens, first_line)
            rows = []
            for i, prompt, answer in zip(batch, prompts, answers, strict=True):
                sample = cell.samples[i]
                rows.append({
                    "depth": sample.meta.get("depth"), "prompt_tokens": prompt.shape[1], "expected": sample.answers,
                    "predicted": answer, "score": self.score(cell.subtask, answer, sample),
                })  # fmt: skip
            yield batch, rows


def _format(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _short(text: str, limit: int = 40) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:24]}…{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def base_name(label: str) -> str:
    """The task's registered name from a label: ``niah[depths=2]`` -> ``niah``, ``ruler/vt`` -> ``ruler``."""
    return label.split("[", 1)[0].split("/", 1)[0]


def group_of(label: str) -> str:
    """A subtask label's task label: ``ruler[haystack=x]/vt`` -> ``ruler[haystack=x]``."""
    head, bracket, rest = label.partition("[")
    if bracket:
        inside = rest.partition("]")[0]
        return f"{head}[{inside}]"
    return label.split("/", 1)[0]


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
