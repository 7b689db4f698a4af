"""Metrics for LongBench-format datasets (Bai et al., 2024, "LongBench"), as LongBench's ``eval.py``
computes them, quirks included: QA F1 after answer normalisation (English words, or jieba words for
Chinese), ROUGE-L from the ``rouge`` package (Chinese cut into jieba words first), classification,
passage retrieval and counting, and code edit similarity (fuzzywuzzy's ratio); plus exact match."""

from __future__ import annotations

import difflib
import re
import string
import sys
from collections import Counter

from longlab.errors import LonglabError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
# The Chinese punctuation LongBench strips besides ASCII punctuation (its normalize_zh_answer)
_ZH_PUNCTUATION = _PUNCTUATION | set(
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Lowercase, drop ASCII and Chinese punctuation, drop all whitespace."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ZH_PUNCTUATION).split())


def _jieba_words(text: str) -> list[str]:
    """jieba's default (precise, HMM) cut, as LongBench calls it; the dictionary loads on first use."""
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)  # not the "Building prefix dict ..." lines on every first use
    return list(jieba.cut(text, cut_all=False))


def _f1(predicted: list[str], expected: list[str]) -> float:
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, reference: str, **_: object) -> float:
    """Token F1 of the normalised words."""
    return _f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def qa_f1_zh(prediction: str, reference: str, **_: object) -> float:
    """Token F1 of jieba's words, each normalised (Chinese punctuation too); empty words dropped."""

    def words(text: str) -> list[str]:
        return [w for w in map(normalize_zh_answer, _jieba_words(text)) if w]

    return _f1(words(prediction), words(reference))


# LongBench scores ROUGE with the ``rouge`` package, whose LCS reconstruction recurses once per step;
# on long single-sentence texts it hits Python's recursion limit (1000) and LongBench's bare
# ``except`` turns that into a score of 0. Below that recursion, LongBench's call stack holds 9 frames
# for rouge_score (10 for rouge_zh_score, which calls it): the reconstruction may nest 1000 - 9 frames.
_RECURSION_LIMIT = 1000
_FRAMES_BELOW = {"rouge_l": 9, "rouge_zh": 10}


def _sentences(text: str) -> list[str]:
    """The ``rouge`` package's sentences: split at '.', whitespace collapsed, empty pieces dropped."""
    return [" ".join(piece.split()) for piece in text.split(".") if piece]


def _reconstruction_frames(x: list[str], y: list[str]) -> int:
    """How deep the ``rouge`` package's recursive LCS reconstruction of x and y nests."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            table[i][j] = table[i - 1][j - 1] + 1 if x[i - 1] == y[j - 1] else max(table[i - 1][j], table[i][j - 1])
    i, j, frames = len(x), len(y), 1
    while i and j:
        if x[i - 1] == y[j - 1]:
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
        frames += 1
    return frames


def _rouge(prediction: str, reference: str, frames_below: int) -> float:
    from rouge import Rouge

    allowed = _RECURSION_LIMIT - frames_below
    hypothesis, references = _sentences(prediction), _sentences(reference)
    for ref in references:  # the package reconstructs each (reference, hypothesis) sentence pair
        for hyp in hypothesis:
            if _reconstruction_frames(ref.split(" "), hyp.split(" ")) > allowed:
                return 0.0  # LongBench: RecursionError, caught
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, _stack_depth() + _RECURSION_LIMIT + 100))  # our stack is deeper
    try:
        return Rouge().get_scores([prediction], [reference], avg=True)["rouge-l"]["f"]
    except Exception:  # LongBench: any failure (an empty hypothesis or reference) scores 0
        return 0.0
    finally:
        sys.setrecursionlimit(limit)


def _stack_depth() -> int:
    frame, depth = sys._getframe(), 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1
    return depth


def rouge_l(prediction: str, reference: str, **_: object) -> float:
    """ROUGE-L F of the ``rouge`` package (summary level, sentences split at '.', case-sensitive words)."""
    return _rouge(prediction, reference, _FRAMES_BELOW["rouge_l"])


def rouge_zh(prediction: str, reference: str, **_: object) -> float:
    """ROUGE-L of the texts cut into jieba words joined with spaces."""
    joined = [" ".join(_jieba_words(text)) for text in (prediction, reference)]
    return _rouge(*joined, _FRAMES_BELOW["rouge_zh"])


def exact_match(prediction: str, reference: str, **_: object) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def classification(prediction: str, reference: str, all_classes: list[str] | None = None, **_: object) -> float:
    """LongBench: the classes named in the prediction, less those that are only part of the reference;
    1 / (number left) when the reference is among them. LongBench removes those from the list while
    iterating over it, so the class after each one removed is never checked; kept here."""
    if all_classes is None:
        raise LonglabError("classification needs all_classes (the dataset's list of class names)")
    named = [c for c in all_classes if c in prediction]
    index = 0
    while index < len(named):  # a for loop over a list that shrinks under it
        name = named[index]
        if name in reference and name != reference:
            named.remove(name)
        index += 1
    return 1.0 / len(named) if reference in named else 0.0


def _share_equal(prediction: str, wanted: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == wanted for n in numbers) / len(numbers) if numbers else 0.0


def _paragraph(reference: str, pattern: str) -> str:
    found = re.findall(pattern, reference)
    if not found:
        raise LonglabError(f"retrieval: the reference answer {reference!r} does not match {pattern!r}")
    return found[0]


# How a retrieval dataset's reference names its paragraph
PARAGRAPH = {"retrieval": r"Paragraph (\d+)", "retrieval_zh": r"段落(\d+)"}


def retrieval(prediction: str, reference: str, **_: object) -> float:
    """Share of the numbers in the prediction equal to the reference's "Paragraph N"."""
    return _share_equal(prediction, _paragraph(reference, PARAGRAPH["retrieval"]))


def retrieval_zh(prediction: str, reference: str, **_: object) -> float:
    """Share of the numbers in the prediction equal to the reference's "段落N"."""
    return _share_equal(prediction, _paragraph(reference, PARAGRAPH["retrieval_zh"]))


def count(prediction: str, reference: str, **_: object) -> float:
    """Share of the numbers in the prediction equal to the reference count."""
    return _share_equal(prediction, str(reference))


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy's ``fuzz.ratio`` as LongBench runs it (without python-Levenshtein): equal strings 100,
    an empty one 0, else difflib's similarity x 100 rounded to an integer."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return round(100 * difflib.SequenceMatcher(None, a, b).ratio())


def code_similarity(prediction: str, reference: str, **_: object) -> float:
    """LongBench code completion: edit similarity of the first line with no ` # or // in it."""
    lines = prediction.lstrip("\n").split("\n")
    first = next((line for line in lines if not any(mark in line for mark in ("`", "#", "//"))), "")
    return fuzz_ratio(first, reference) / 100


METRICS = {
    "qa_f1": qa_f1,
    "qa_f1_zh": qa_f1_zh,
    "rouge_l": rouge_l,
    "rouge_zh": rouge_zh,
    "exact_match": exact_match,
    "classification": classification,
    "retrieval": retrieval,
    "retrieval_zh": retrieval_zh,
    "count": count,
    "code_similarity": code_similarity,
}

# LongBench's metric per dataset (its eval.py dataset2metric)
DATASET_METRIC = {
    "narrativeqa": "qa_f1",
    "qasper": "qa_f1",
    "multifieldqa_en": "qa_f1",
    "multifieldqa_zh": "qa_f1_zh",
    "hotpotqa": "qa_f1",
    "2wikimqa": "qa_f1",
    "musique": "qa_f1",
    "dureader": "rouge_zh",
    "gov_report": "rouge_l",
    "qmsum": "rouge_l",
    "multi_news": "rouge_l",
    "vcsum": "rouge_zh",
    "trec": "classification",
    "triviaqa": "qa_f1",
    "samsum": "rouge_l",
    "lsht": "classification",
    "passage_retrieval_en": "retrieval",
    "passage_count": "count",
    "passage_retrieval_zh": "retrieval_zh",
    "lcc": "code_similarity",
    "repobench-p": "code_similarity",
}

# LongBench-E: the same data spread evenly over lengths, scored as the dataset it comes from
LONGBENCH_E = ["qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
               "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p"]  # fmt: skip


def longbench_dataset(name: str) -> str | None:
    """The LongBench dataset a file stem names (``qasper``, ``qasper_e`` -> ``qasper``), else None."""
    if name in DATASET_METRIC:
        return name
    base = name.removesuffix("_e")
    return base if name.endswith("_e") and base in LONGBENCH_E else None


def best_over_references(metric: str, prediction: str, references: list[str], all_classes=None) -> float:
    """LongBench scores a prediction against each reference answer and keeps the best (0 with none)."""
    score = METRICS[metric]
    return max([0.0, *(score(prediction, ref, all_classes=all_classes) for ref in references)])
