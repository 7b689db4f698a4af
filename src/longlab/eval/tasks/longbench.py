"""LongBench-format files (the ``jsonl`` task)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from longlab.data.synthetic import Sample
from longlab.errors import SpecError
from longlab.eval.metrics import DATASET_METRIC, METRICS, best_over_references
from longlab.eval.tasks.base import Task, register


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
        if not self.path:
            raise SpecError("task 'jsonl' needs parameter path (e.g. 'jsonl:path=data/qasper.jsonl')")
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
