"""Metrics for LongBench-format datasets (Bai et al., 2024, "LongBench"), as its evaluation defines
them: QA F1 after answer normalisation, ROUGE-L (via ``rouge-score``), classification, passage
retrieval and counting, code edit similarity (via ``rapidfuzz``), and exact match."""

from __future__ import annotations

import re
import string
from collections import Counter

from rapidfuzz import fuzz
from rouge_score import rouge_scorer

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def qa_f1(prediction: str, reference: str, **_: object) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str, **_: object) -> float:
    if not prediction.strip() or not reference.strip():
        return 0.0
    return _ROUGE.score(reference, prediction)["rougeL"].fmeasure


def exact_match(prediction: str, reference: str, **_: object) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def classification(prediction: str, reference: str, all_classes: list[str] | None = None, **_: object) -> float:
    """LongBench: the classes named in the prediction, minus those that are only part of the reference;
    1 / (number named) when the reference is among them."""
    named = [c for c in all_classes or [] if c in prediction]
    named = [c for c in named if not (c in reference and c != reference)]
    return 1.0 / len(named) if reference in named else 0.0


def retrieval(prediction: str, reference: str, **_: object) -> float:
    """LongBench passage retrieval: share of the numbers in the prediction equal to the reference's
    paragraph number."""
    wanted = re.findall(r"Paragraph (\d+)", reference) or re.findall(r"\d+", reference)
    numbers = re.findall(r"\d+", prediction)
    if not wanted or not numbers:
        return 0.0
    return sum(n == wanted[0] for n in numbers) / len(numbers)


def count(prediction: str, reference: str, **_: object) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == str(reference) for n in numbers) / len(numbers) if numbers else 0.0


def code_similarity(prediction: str, reference: str, **_: object) -> float:
    """LongBench code completion: edit similarity of the first line that is not a comment."""
    lines = [line for line in prediction.lstrip("\n").split("\n") if not line.strip().startswith(("#", "//", "`"))]
    return fuzz.ratio(lines[0] if lines else "", reference) / 100


METRICS = {
    "qa_f1": qa_f1,
    "rouge_l": rouge_l,
    "exact_match": exact_match,
    "classification": classification,
    "retrieval": retrieval,
    "count": count,
    "code_similarity": code_similarity,
}

# LongBench's choice of metric per dataset (file stem)
DATASET_METRIC = {
    **dict.fromkeys(
        ["narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "triviaqa"], "qa_f1"
    ),
    **dict.fromkeys(["gov_report", "qmsum", "multi_news", "samsum", "vcsum"], "rouge_l"),
    **dict.fromkeys(["trec", "lsht"], "classification"),
    **dict.fromkeys(["passage_retrieval_en", "passage_retrieval_zh"], "retrieval"),
    "passage_count": "count",
    **dict.fromkeys(["lcc", "repobench-p"], "code_similarity"),
}


def best_over_references(metric: str, prediction: str, references: list[str], all_classes=None) -> float:
    """LongBench scores a prediction against each reference answer and keeps the best."""
    score = METRICS[metric]
    return max(score(prediction, ref, all_classes=all_classes) for ref in references)
