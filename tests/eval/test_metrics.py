"""Metrics on hand-checked cases (RULER string matching, LongBench normalisation and scores)."""

from __future__ import annotations

import pytest

import longlab
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


# -- LongBench's metrics, dataset by dataset (its eval.py), quirks included ---------------------------

LONGBENCH_METRIC = {  # LongBench's dataset2metric, function by function
    "narrativeqa": "qa_f1", "qasper": "qa_f1", "multifieldqa_en": "qa_f1", "multifieldqa_zh": "qa_f1_zh",
    "hotpotqa": "qa_f1", "2wikimqa": "qa_f1", "musique": "qa_f1", "dureader": "rouge_zh", "gov_report": "rouge_l",
    "qmsum": "rouge_l", "multi_news": "rouge_l", "vcsum": "rouge_zh", "trec": "classification", "triviaqa": "qa_f1",
    "samsum": "rouge_l", "lsht": "classification", "passage_retrieval_en": "retrieval", "passage_count": "count",
    "passage_retrieval_zh": "retrieval_zh", "lcc": "code_similarity", "repobench-p": "code_similarity",
}  # fmt: skip
LONGBENCH_E = ["qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
               "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p"]  # fmt: skip


def test_every_longbench_dataset_has_its_metric():
    assert metrics.DATASET_METRIC == LONGBENCH_METRIC
    for name, metric in LONGBENCH_METRIC.items():
        assert metrics.longbench_dataset(name) == name
        assert metrics.METRICS[metric].__name__ == metric  # the name says which function scores it
    for name in LONGBENCH_E:  # LongBench-E files are scored as the dataset they come from
        assert metrics.longbench_dataset(f"{name}_e") == name
    for name in ["dureader_e", "lsht_e", "mydata", "qasper_subset"]:
        assert metrics.longbench_dataset(name) is None


def test_chinese_qa_f1_cuts_jieba_words_and_normalises_each():
    # jieba: 首都/是/北京 and 北京/是/中国/的/首都/。 ("。" normalises to nothing and is dropped):
    # common 3 -> P 3/3, R 3/5 -> F1 0.75
    assert metrics.qa_f1_zh("首都是北京", "北京是中国的首都。") == pytest.approx(0.75)
    assert metrics.qa_f1_zh("北京。", "北京") == 1.0
    assert metrics.qa_f1_zh("", "北京") == 0.0
    assert metrics.normalize_zh_answer("Ａ：北京， 上海！") == "ａ北京上海"  # punctuation and spaces go
    assert metrics.qa_f1("首都是北京", "北京是中国的首都。") == 0.0  # what the English metric gave


def test_chinese_rouge_cuts_jieba_words():
    # jieba words: 会议 讨论 了 预算 和 人员 安排 。 (8) vs 会议 讨论 了 明年 的 预算 。 (7); LCS 会议 讨论 了 预算 。
    # = 5 -> R 5/7, P 5/8, F 2/3
    assert metrics.rouge_zh("会议讨论了预算和人员安排。", "会议讨论了明年的预算。") == pytest.approx(2 / 3, abs=1e-6)
    assert metrics.rouge_l("会议讨论了预算和人员安排。", "会议讨论了明年的预算。") == 0.0  # one "word" each
    assert metrics.rouge_zh("", "会议讨论了明年的预算。") == 0.0


def test_rouge_l_is_the_rouge_packages():
    # the rouge package counts distinct words: reference the/cat/sat/on/mat (5), LCS 3 -> R 3/5, P 1, F 0.75
    assert metrics.rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(0.75, abs=1e-6)
    assert metrics.rouge_l("The Cat", "the cat") == 0.0  # case-sensitive
    assert metrics.rouge_l("a. b", "a b") == pytest.approx(1.0, abs=1e-6)  # sentences split at '.'
    for empty in ["", "...", "."]:  # the package raises; LongBench scores 0
        assert metrics.rouge_l(empty, "anything") == 0.0
        assert metrics.rouge_l("anything", empty) == 0.0


def test_rouge_gives_zero_where_longbench_hits_the_recursion_limit():
    """LongBench's ROUGE recurses once per step of the LCS reconstruction and scores 0 when that passes
    Python's limit of 1000 frames: 9 frames are below it for rouge_score, 10 for rouge_zh_score."""

    def hypothesis(extra):  # reconstructing "zz" against it nests len + 1 frames
        return "zz " + " ".join(f"w{i}" for i in range(extra))

    assert metrics.rouge_l(hypothesis(989), "zz") > 0  # 991 frames
    assert metrics.rouge_l(hypothesis(990), "zz") == 0.0  # 992
    assert metrics.rouge_zh(hypothesis(988), "zz") > 0
    assert metrics.rouge_zh(hypothesis(989), "zz") == 0.0
    assert metrics.rouge_l(hypothesis(990).replace("w500", "w500."), "zz") > 0  # two short sentences


def test_classification_keeps_longbenchs_list_quirk():
    classes = ["num", "number", "number of people"]
    # named: num, number, number of people; "num" (part of the reference) is removed while LongBench
    # iterates, so "number" is skipped and stays: 1 / 2
    assert metrics.classification("number of people", "number of people", all_classes=classes) == 0.5
    assert metrics.classification("it is num", "number", all_classes=classes) == 0.0
    assert metrics.classification("", "number", all_classes=classes) == 0.0  # nothing named
    assert metrics.classification("nmber", "number", all_classes=classes) == 0.0  # no closest-class fallback
    with pytest.raises(longlab.LonglabError, match="all_classes"):
        metrics.classification("num", "num", all_classes=None)


def test_chinese_retrieval_and_references_without_a_paragraph():
    assert metrics.retrieval_zh("段落3", "段落3") == 1.0
    assert metrics.retrieval_zh("答案是段落3，不是段落5", "段落3") == 0.5
    assert metrics.retrieval_zh("", "段落3") == 0.0
    with pytest.raises(longlab.LonglabError, match="does not match"):
        metrics.retrieval("Paragraph 3", "3")  # LongBench's regex finds no paragraph: IndexError there


def test_code_similarity_skips_lines_with_comment_marks_anywhere():
    assert metrics.code_similarity("x = 1  # set x\ny = 2", "y = 2") == 1.0
    assert metrics.code_similarity("\n\nurl = 'http://a'\ny = 2", "y = 2") == 1.0  # "//" inside a string too
    assert metrics.code_similarity("```python\nreturn a\n```", "return a") == 1.0
    assert metrics.code_similarity("# only\n// comments", "y = 2") == 0.0
    assert metrics.code_similarity("", "y = 2") == 0.0
    assert metrics.code_similarity("", "") == 1.0  # fuzzywuzzy: equal strings are 100 before the empty check


def test_fuzz_ratio_is_fuzzywuzzys():
    # difflib: "abc" vs "abd" match 2 of 6 characters -> 66.67, rounded to 67
    assert metrics.fuzz_ratio("abc", "abd") == 67
    assert metrics.code_similarity("abc", "abd") == 0.67
    # difflib's Ratcliff-Obershelp, not an optimal alignment: it takes "a" (a[0] = b[2]) first, which
    # leaves nothing on either side: 2 x 1 / 6 -> 33, where the LCS "ba" would give 67 (rapidfuzz)
    assert metrics.fuzz_ratio("aba", "bca") == 33
    import random
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fuzz = pytest.importorskip("fuzzywuzzy.fuzz")
    rng = random.Random(0)
    pairs = [("".join(rng.choice("ab(). x") for _ in range(rng.randint(0, 40))),
              "".join(rng.choice("ab(). x") for _ in range(rng.randint(0, 40)))) for _ in range(500)]  # fmt: skip
    assert [metrics.fuzz_ratio(a, b) for a, b in pairs] == [fuzz.ratio(a, b) for a, b in pairs]


def test_best_over_references_with_no_reference_is_zero():
    assert metrics.best_over_references("qa_f1", "anything", []) == 0.0
