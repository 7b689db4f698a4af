"""LongBench-format files (the ``jsonl`` task), prompted, truncated, generated and scored as LongBench's
``pred.py`` and ``eval.py`` do for the dataset the file names (``qasper.jsonl``, ``qasper_e.jsonl``)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import string
from dataclasses import dataclass
from pathlib import Path

from longlab.data.synthetic import SLOT, Sample, split_template
from longlab.errors import SpecError
from longlab.eval.metrics import DATASET_METRIC, METRICS, PARAGRAPH, best_over_references, longbench_dataset
from longlab.eval.tasks.base import Task, register
from longlab.eval.tasks.longbench_prompts import PROMPTS

# LongBench's generation budget per dataset (config/dataset2maxlen.json)
MAX_NEW_TOKENS = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32, "2wikimqa": 32,
    "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512, "vcsum": 512, "trec": 64,
    "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32, "passage_retrieval_en": 32,
    "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
}  # fmt: skip

# Few-shot datasets whose answer is the first line (LongBench's eval.py keeps only it)
FIRST_LINE = frozenset({"trec", "triviaqa", "samsum", "lsht"})
# Prompted without the chat template (LongBench's pred.py: "chat models are better off without")
NO_CHAT = FIRST_LINE | {"lcc", "repobench-p"}

GENERIC_TEMPLATE = "{context}\n\nQuestion: {input}\nAnswer:"
GENERIC_NEW_TOKENS = 64


def _template_fields(template: str) -> set[str]:
    """The field names a str.format template uses; a malformed template or a positional field fails."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        raise SpecError(f"jsonl: parameter 'template' is not a valid format string ({error}): {template!r}") from None
    roots = {name.split(".")[0].split("[")[0] for name in names}
    if "" in roots or any(root.isdigit() for root in roots):
        raise SpecError(f"jsonl: parameter 'template' must name its fields, like {{context}}, got {template!r}")
    return roots


@register
@dataclass(frozen=True)
class Jsonl(Task):
    """A LongBench-format file (fields context, input, answers, all_classes). A file named after a
    LongBench dataset (qasper.jsonl, qasper_e.jsonl; or dataset=) gets that dataset's prompt, generation
    budget, metric, first-line rule and chat choice; other files a generic QA prompt, 64 tokens, the first
    line and qa_f1. The whole prompt is cut in the middle to fit, as LongBench does."""

    name = "jsonl"
    unlabelled = ("path",)
    max_new_tokens = GENERIC_NEW_TOKENS
    default_samples = 20
    path: str = ""
    dataset: str | None = None
    metric: str | None = None
    template: str | None = None
    new_tokens_: int | None = dataclasses.field(default=None, metadata={"spec_name": "max_new_tokens"})

    def __post_init__(self) -> None:
        if not self.path:
            raise SpecError("task 'jsonl' needs parameter path (e.g. 'jsonl:path=data/qasper.jsonl')")
        if not Path(self.path).is_file():
            raise SpecError(f"jsonl: parameter 'path' must be a LongBench-format .jsonl file, got {self.path!r}")
        if self.dataset is not None and longbench_dataset(self.dataset) is None:
            raise SpecError(f"jsonl: parameter 'dataset' must be a LongBench dataset ({', '.join(DATASET_METRIC)}, "
                            f"or one with _e), got {self.dataset!r}")  # fmt: skip
        if self.metric is not None and self.metric not in METRICS:
            raise SpecError(f"jsonl: parameter 'metric' must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.new_tokens_ is not None and self.new_tokens_ < 1:
            raise SpecError(f"jsonl: parameter 'max_new_tokens' must be at least 1, got {self.new_tokens_}")
        if "context" not in _template_fields(self.chosen_template()):
            raise SpecError("jsonl: parameter 'template' must contain {context}")

    def identity(self) -> str:
        """The spec plus a digest of the file's contents: an edited file is another task."""
        return f"{super().identity()},content={self.content_digest}"

    @functools.cached_property
    def content_digest(self) -> str:
        return hashlib.sha256(Path(self.path).read_bytes()).hexdigest()[:16]

    # -- what the dataset decides -----------------------------------------------------------------

    def longbench(self) -> str | None:
        """The LongBench dataset this file is (``dataset=``, else the file's stem), or None."""
        return longbench_dataset(self.dataset or Path(self.path).stem)

    def chosen_template(self) -> str:
        return self.template or PROMPTS.get(self.longbench(), GENERIC_TEMPLATE)

    def chosen_metric(self) -> str:
        return self.metric or DATASET_METRIC.get(self.longbench(), "qa_f1")

    def subtasks(self):
        return [f"jsonl/{Path(self.path).stem}"]

    def new_tokens(self, subtask: str) -> int:
        return self.new_tokens_ or MAX_NEW_TOKENS.get(self.longbench(), GENERIC_NEW_TOKENS)

    def first_line(self, subtask: str) -> bool:
        """LongBench keeps the first line for trec, triviaqa, samsum and lsht; the others run to their
        budget. Files that are no LongBench dataset keep the first line too (unless scored as code)."""
        dataset = self.longbench()
        if dataset is None:
            return self.chosen_metric() != "code_similarity"
        return dataset in FIRST_LINE

    def uses_chat(self, subtask: str) -> bool:
        return self.longbench() not in NO_CHAT

    # -- the file ---------------------------------------------------------------------------------

    @functools.cached_property
    def rows(self) -> list[tuple[int, dict]]:
        """(1-based line number, row) of every non-blank line, each checked; read once."""
        fields = _template_fields(self.chosen_template())
        classes = self.chosen_metric() == "classification"
        pattern = PARAGRAPH.get(self.chosen_metric())
        rows = []
        with open(self.path, encoding="utf-8") as f:
            number = 0
            try:
                for number, line in enumerate(f, start=1):
                    if line.strip():
                        rows.append((number, self._check(number, line, fields, classes, pattern)))
            except UnicodeDecodeError as error:
                raise SpecError(f"{self.path}, line {number + 1}: not UTF-8 text ({error.reason})") from None
        if not rows:
            raise SpecError(f"{self.path}: the file is empty (no JSON rows)")
        return rows

    def _check(self, number: int, line: str, fields: set[str], classes: bool, pattern: str | None) -> dict:
        where = f"{self.path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise SpecError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(row, dict):
            raise SpecError(f"{where}: each line must be a JSON object with context, input and answers, "
                            f"got {type(row).__name__}")  # fmt: skip
        for field in ["context", *sorted(fields - {"context"})]:
            if field not in row:
                used = "" if field == "context" else " (the template uses it)"
                raise SpecError(f"{where}: no field {field!r}{used}; the row has {', '.join(row) or 'no fields'}")
        for field in ("context", "input"):
            if field in fields and not isinstance(row[field], str):
                raise SpecError(f"{where}: field {field!r} must be a string, got {type(row[field]).__name__}")
        answers = row.get("answers")
        if "answers" not in row:
            raise SpecError(f"{where}: no field 'answers' (a list of reference answers)")
        if not isinstance(answers, list) or not answers:
            got = f"a {type(answers).__name__}" if answers != [] else "an empty list"
            raise SpecError(f"{where}: field 'answers' must be a non-empty list of strings, got {got}: {answers!r}")
        if not all(isinstance(a, str) or (isinstance(a, int) and not isinstance(a, bool)) for a in answers):
            raise SpecError(f"{where}: field 'answers' must hold strings, got {answers!r}")
        row["answers"] = [str(a) for a in answers]
        if classes:
            names = row.get("all_classes")
            if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
                raise SpecError(f"{where}: classification needs field 'all_classes', a list of class names, "
                                f"got {names!r}")  # fmt: skip
        if pattern and not all(re.search(pattern, a) for a in row["answers"]):
            raise SpecError(f"{where}: every answer must name its paragraph (as {pattern!r}), got {row['answers']!r}")
        return row

    # -- samples and scores -----------------------------------------------------------------------

    def samples(self, subtask, tokenizer, length, count, seed):
        rows = self.rows
        if len(rows) < count:
            raise SpecError(f"{self.path} has {len(rows)} rows (last on line {rows[-1][0]}), fewer than the "
                            f"{count} samples asked for (--samples)")  # fmt: skip
        new_tokens = self.new_tokens(subtask)
        budget = length - new_tokens  # the prompt's tokens; the answer's budget is part of the length
        if budget < 2:
            raise SpecError(f"jsonl: length {length} cannot hold a prompt and {new_tokens} new tokens")
        template = self.chosen_template()
        out = []
        for number, row in rows[:count]:
            prompt = template.format(**row)
            filled = template.format(**{**row, "context": SLOT})
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            if len(ids) > budget:  # LongBench: keep the first and the last half of the budget
                half = budget // 2
                prompt = tokenizer.decode(ids[:half], skip_special_tokens=True) + tokenizer.decode(
                    ids[len(ids) - half :], skip_special_tokens=True
                )
            meta = {"task": subtask, "length": length, "all_classes": row.get("all_classes"), "line": number}
            # a cut that reaches into the instruction or the question leaves no split (split_template: None)
            out.append(Sample(prompt, row["answers"], meta, split_template(prompt, filled)))
        return out

    def score(self, subtask, output, sample):
        if self.first_line(subtask):  # LongBench's post-processing of the few-shot answers
            output = output.lstrip("\n").split("\n")[0]
        metric = self.chosen_metric()
        return 100 * best_over_references(metric, output, sample.answers, sample.meta.get("all_classes"))
