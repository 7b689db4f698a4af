"""Metrics on hand-checked cases (RULER string matching, LongBench normalisation and scores)."""

from __future__ import annotations

import pytest

from longlab.eval import metrics


@pytest.mark.parametrize(
    "text,normalised",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  An apple, a pear;   the plum. ", "apple pear plum"),
        ("Theatre and anthem", "theatre and anthem"),  # articles only as whole words
    ],
)
def test_longbench_normalisation(text, normalised):
    assert metrics.normalize_answer(text) == normalised


def test_qa_f1_by_hand():
    # prediction tokens: paris france capital (3); reference: paris (1); common 1 -> P 1/3, R 1 -> F1 0.5
    assert metrics.qa_f1("Paris, the capital of France", "Paris") == pytest.approx(2 * (1 / 4) * 1 / (1 / 4 + 1))
    assert metrics.qa_f1("The answer is Paris", "paris") == pytest.approx(2 * (1 / 3) / (1 / 3 + 1))
    assert metrics.qa_f1("London", "Paris") == 0.0
    assert metrics.qa_f1("the", "a") == 0.0


def test_rouge_l_by_hand():
    # LCS of "the cat sat" and "the cat sat on the mat" is 3: P = 1, R = 1/2, F = 2/3
    assert metrics.rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    assert metrics.rouge_l("", "anything") == 0.0


def test_classification_follows_longbench():
    classes = ["DESC", "ENTY", "ABBR", "NUM"]
    assert metrics.classification("Type: DESC", "DESC", all_classes=classes) == 1.0
    assert metrics.classification("DESC or ENTY", "DESC", all_classes=classes) == 0.5
    assert metrics.classification("NUM", "DESC", all_classes=classes) == 0.0


def test_retrieval_count_and_code():
    assert metrics.retrieval("Paragraph 12", "Paragraph 12") == 1.0
    assert metrics.retrieval("Paragraph 3 or Paragraph 12", "Paragraph 12") == 0.5
    assert metrics.count("There are 7 unique paragraphs", 7) == 1.0
    assert metrics.code_similarity("# comment\nreturn x + 1", "return x + 1") == 1.0


def test_best_over_references():
    assert metrics.best_over_references("qa_f1", "blue whale", ["whale", "blue whale"]) == 1.0
