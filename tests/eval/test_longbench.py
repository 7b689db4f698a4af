"""The jsonl task as LongBench runs its datasets: prompt, budget, truncation, stopping, chat, scoring,
and the errors a malformed file gets (each naming the file and the line)."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from transformers import AutoTokenizer

import longlab
from longlab.errors import SpecError
from longlab.eval.tasks import base, parse_task
from longlab.eval.tasks.base import CellContext

ROW = {"input": "What colour is the sky?", "context": "The sky is blue.", "answers": ["blue"], "all_classes": None,
       "length": 5}  # fmt: skip
FIRST_LINE = {"trec", "triviaqa", "samsum", "lsht"}
NO_CHAT = FIRST_LINE | {"lcc", "repobench-p"}
BUDGETS = {"narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32,
           "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512,
           "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32,
           "passage_retrieval_en": 32, "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64}  # fmt: skip


@pytest.fixture
def tokenizer():
    return _tiny_tokenizer()


def _file(tmp_path, name, rows, raw=None):
    path = tmp_path / f"{name}.jsonl"
    path.write_text(raw if raw is not None else "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _task(path, **params):
    spec = ",".join([f"path={path}", *(f"{k}={v}" for k, v in params.items())])
    return parse_task(f"jsonl:{spec}")


# -- per dataset: stopping, chat, budget, prompt ------------------------------------------------------


def test_only_the_few_shot_datasets_stop_at_the_first_line_and_skip_the_chat_template(tmp_path):
    for name in BUDGETS:
        task = _task(_file(tmp_path, name, [ROW]))
        subtask = f"jsonl/{name}"
        assert task.first_line(subtask) == (name in FIRST_LINE), name
        assert task.uses_chat(subtask) == (name not in NO_CHAT), name
        assert task.new_tokens(subtask) == BUDGETS[name], name
    lcc_e = _task(_file(tmp_path, "lcc_e", [ROW]))
    assert (lcc_e.first_line("jsonl/lcc_e"), lcc_e.uses_chat("jsonl/lcc_e"), lcc_e.new_tokens("jsonl/lcc_e")) == (
        False, False, 64)  # fmt: skip
    other = _task(_file(tmp_path, "mydata", [ROW]))  # no LongBench dataset: the generic format
    assert (other.first_line("jsonl/mydata"), other.uses_chat("jsonl/mydata"), other.new_tokens("jsonl/mydata")) == (
        True, True, 64)  # fmt: skip
    assert _task(_file(tmp_path, "qasper", [ROW]), max_new_tokens=7).new_tokens("jsonl/qasper") == 7


def test_measure_passes_the_chat_choice_and_the_stopping_rule(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(base, "encode", lambda tok, prompt, chat: calls.append(("encode", chat)) or torch.ones(1, 3))

    def generate(model, tok, prompts, new, first):
        calls.append(("generate", new, first))
        return ["x"]

    monkeypatch.setattr(base, "generate_answers", generate)
    for name, chat, first, new in [("lcc", False, False, 64), ("qasper", True, False, 128), ("trec", False, True, 64)]:
        task = _task(_file(tmp_path, name, [{**ROW, "all_classes": ["x"]}]))
        samples = [base.Sample("prompt", ["x"], {"all_classes": ["x"]})]
        cell = CellContext(None, None, f"jsonl/{name}", 512, 1, samples, True, 1, None)
        calls.clear()
        list(task.measure(cell, [0]))
        assert calls == [("encode", chat), ("generate", new, first)], name
        cell.chat = False
        calls.clear()
        list(task.measure(cell, [0]))
        assert calls[0] == ("encode", False)


def test_longbench_prompts_and_their_overrides(tmp_path, tokenizer):
    (sample,) = _task(_file(tmp_path, "qasper", [ROW])).samples("jsonl/qasper", tokenizer, 4096, 1, 0)
    assert sample.prompt.startswith("You are given a scientific article and a question.")
    assert sample.prompt.endswith("Question: What colour is the sky?\n\nAnswer:")
    assert "Article: The sky is blue.\n\n Answer the question based on the above article" in sample.prompt
    (code,) = _task(_file(tmp_path, "repobench-p_e", [{**ROW, "input": "import os\n"}])).samples(
        "jsonl/repobench-p_e", tokenizer, 4096, 1, 0)  # fmt: skip
    assert code.prompt == "Please complete the code given below. \nThe sky is blue.import os\nNext line of code:\n"
    assert _samples(_file(tmp_path, "multifieldqa_zh", [ROW]))[0].prompt.startswith("阅读以下文字并用中文简短回答")
    custom = _samples(_file(tmp_path, "qasper", [ROW]), template="Q {input} C {context}")
    assert custom[0].prompt == "Q What colour is the sky? C The sky is blue."
    named = _file(tmp_path, "mine", [ROW])
    assert _task(named, dataset="hotpotqa").new_tokens("jsonl/mine") == 32
    assert _samples(named, dataset="hotpotqa")[0].prompt.startswith("Answer the question based on the given passages.")
    with pytest.raises(SpecError, match="dataset"):
        _task(_file(tmp_path, "mine", [ROW]), dataset="nonesuch")


def test_the_whole_prompt_is_cut_in_the_middle(tmp_path, tokenizer):
    """LongBench keeps the first and the last half of the budget of the whole tokenized prompt, so the
    instruction at the start and the question at the end both survive."""
    row = {**ROW, "context": "start " + "filler " * 2000 + "end"}
    task = _task(_file(tmp_path, "qasper", [row]))
    (sample,) = task.samples("jsonl/qasper", tokenizer, 600, 1, 0)
    budget = 600 - 128
    ids = tokenizer(task.chosen_template().format(**row), add_special_tokens=False)["input_ids"]
    half = budget // 2
    expected = tokenizer.decode(ids[:half]) + tokenizer.decode(ids[-half:])
    assert sample.prompt == expected
    assert sample.prompt.startswith("You are given a scientific article") and "filler" in sample.prompt
    assert sample.prompt.endswith("Question: What colour is the sky?\n\nAnswer:")
    assert abs(len(tokenizer(sample.prompt, add_special_tokens=False)["input_ids"]) - budget) <= 2
    # a template longer than the budget is cut too, where the old context-only cut could not fit it
    long_head = _task(_file(tmp_path, "mine", [row]), template="HEAD " * 300 + "{context} Q: {input}")
    (cut,) = long_head.samples("jsonl/mine", tokenizer, 200, 1, 0)
    assert cut.prompt.startswith("HEAD HEAD") and cut.prompt.endswith("Q: What colour is the sky?")


# -- scoring through the task -------------------------------------------------------------------------


def test_scores_follow_the_dataset(tmp_path, tokenizer):
    def score(name, output, answers, all_classes=None):
        task = _task(_file(tmp_path, name, [{**ROW, "answers": answers, "all_classes": all_classes}]))
        (sample,) = task.samples(f"jsonl/{name}", tokenizer, 4096, 1, 0)
        return task.score(f"jsonl/{name}", output, sample)

    assert score("multifieldqa_zh", "首都是北京", ["北京是中国的首都。"]) == pytest.approx(75)
    for name in ["dureader", "vcsum"]:
        assert score(name, "会议讨论了预算和人员安排。", ["会议讨论了明年的预算。"]) == pytest.approx(200 / 3, abs=1e-4)
    assert score("passage_retrieval_zh", "段落3", ["段落3"]) == 100
    # code: the first line with no comment mark in the whole generation
    assert score("lcc", "x = 1  # set x\ny = 2\nz = 3", ["y = 2"]) == 100
    assert score("repobench-p", "\n// note\nreturn a;", ["return a;"]) == 100
    # few-shot: the first line after leading newlines
    assert score("trec", "\nDESC\nENTY", ["DESC"], ["DESC", "ENTY"]) == 100
    assert score("triviaqa", "\n\nParis\nQuestion: next", ["Paris"]) == 100
    # others read the whole answer
    assert score("hotpotqa", "Paris\nFrance", ["Paris France"]) == 100


class _Scripted:
    """A model whose generate() writes a fixed continuation a token at a time, honouring the stopping
    criteria as transformers does."""

    device = torch.device("cpu")

    def __init__(self, continuation: list[int]):
        self.continuation = continuation

    def generate(self, ids, max_new_tokens, stopping_criteria, **kwargs):
        for token in self.continuation[:max_new_tokens]:
            ids = torch.cat([ids, torch.full((ids.shape[0], 1), token)], dim=1)
            if bool(stopping_criteria(ids, None).all()):
                break
        return ids


def test_first_line_generation_reads_past_leading_newlines(tokenizer):
    from longlab.generation import generate_answers

    continuation = tokenizer("\n\nParis\nQuestion: next", add_special_tokens=False)["input_ids"]
    prompt = tokenizer("Answer:", return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert generate_answers(_Scripted(continuation), tokenizer, [prompt], 32) == ["Paris"]
    assert generate_answers(_Scripted(continuation), tokenizer, [prompt], 32, first_line=False) == [
        "\n\nParis\nQuestion: next"]  # fmt: skip


# -- malformed files ----------------------------------------------------------------------------------


@functools.cache
def _tiny_tokenizer():
    return AutoTokenizer.from_pretrained(longlab.model_path("tiny"))


def _samples(path, count=1, **params):
    return _task(path, **params).samples(f"jsonl/{path.stem}", _tiny_tokenizer(), 4096, count, 0)


@pytest.mark.parametrize(
    "raw,message",
    [
        (json.dumps(ROW) + "\n\n{not json}\n", r"qasper\.jsonl, line 3: not valid JSON"),
        (json.dumps(ROW) + "\n" + json.dumps([1, 2]) + "\n", r"qasper\.jsonl, line 2: each line must be a JSON object"),
        (json.dumps({k: v for k, v in ROW.items() if k != "context"}) + "\n", r"line 1: no field 'context'"),
        ("\n" + json.dumps({k: v for k, v in ROW.items() if k != "input"}) + "\n", r"line 2: no field 'input' \(the"),
        (json.dumps({k: v for k, v in ROW.items() if k != "answers"}) + "\n", r"line 1: no field 'answers'"),
        (json.dumps({**ROW, "answers": "blue"}) + "\n", r"line 1: field 'answers' must be a non-empty list .* a str"),
        (json.dumps({**ROW, "answers": []}) + "\n", r"line 1: field 'answers' .* an empty list"),
        (json.dumps({**ROW, "context": 5}) + "\n", r"line 1: field 'context' must be a string"),
        ("\n \n", r"qasper\.jsonl: the file is empty"),
        ("", r"qasper\.jsonl: the file is empty"),
    ],
)
def test_malformed_rows_name_the_file_and_line(tmp_path, raw, message):
    with pytest.raises(SpecError, match=message):
        _samples(_file(tmp_path, "qasper", [], raw=raw), count=1)


def test_fewer_rows_than_samples_says_how_many(tmp_path):
    path = _file(tmp_path, "qasper", [], raw=json.dumps(ROW) + "\n\n" + json.dumps(ROW) + "\n")
    with pytest.raises(SpecError, match=r"qasper\.jsonl has 2 rows \(last on line 3\), fewer than the 5 samples"):
        _samples(path, count=5)
    assert len(_samples(path, count=2)) == 2


def test_template_fields_must_be_in_every_row(tmp_path):
    path = _file(tmp_path, "mine", [ROW, {**ROW, "question": "q"}])
    with pytest.raises(SpecError, match=r"mine\.jsonl, line 1: no field 'question' \(the template uses it\)"):
        _samples(path, template="{context} {question}")
    with pytest.raises(SpecError, match="must contain"):
        _task(path, template="{input}")
    with pytest.raises(SpecError, match="valid format string"):
        _task(path, template="{context")
    with pytest.raises(SpecError, match="name its fields"):
        _task(path, template="{context} {}")
    # input may be absent where the template does not use it (lcc, passage_count)
    no_input = {k: v for k, v in ROW.items() if k != "input"}
    assert _samples(_file(tmp_path, "lcc", [no_input]))[0].prompt.endswith("Next line of code:\n")
    assert _samples(_file(tmp_path, "passage_count", [{**no_input, "answers": [3]}]))[0].answers == ["3"]


def test_dataset_specific_fields_are_checked(tmp_path):
    with pytest.raises(SpecError, match=r"trec\.jsonl, line 1: classification needs field 'all_classes'"):
        _samples(_file(tmp_path, "trec", [ROW]))
    with pytest.raises(SpecError, match=r"passage_retrieval_en\.jsonl, line 1: every answer must name its paragraph"):
        _samples(_file(tmp_path, "passage_retrieval_en", [{**ROW, "answers": ["3"]}]))


# -- end to end ---------------------------------------------------------------------------------------


def test_a_jsonl_cell_runs_through_the_runner(tmp_path):
    from longlab.eval.runner import EvalConfig, run

    rows = [{**ROW, "context": "Paragraph 1: a. Paragraph 2: b.", "answers": ["Paragraph 2"]}] * 2
    path = _file(tmp_path, "passage_retrieval_en", rows)
    out = tmp_path / "out"
    run(EvalConfig(out=str(out), methods=["none"], tasks=[f"jsonl:path={path}"], lengths=[256], samples=2))
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["task"] for r in results] == ["jsonl/passage_retrieval_en"] * 2
    assert all(0 <= r["score"] <= 100 and r["prompt_tokens"] <= 256 - 32 + 2 for r in results)


def test_two_files_of_one_name_are_refused_rather_than_merged(tmp_path):
    from longlab.errors import LonglabError
    from longlab.eval.runner import EvalConfig, run

    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    tasks = [f"jsonl:path={_file(folder, 'qasper', [ROW])}" for folder in (first, second)]
    with pytest.raises(LonglabError, match="would both report as 'jsonl/qasper'"):
        run(EvalConfig(out=str(tmp_path / "out"), methods=["none"], tasks=tasks, lengths=[256], samples=1))


def test_a_folder_refuses_another_file_of_the_same_name_or_an_edited_file(tmp_path):
    from longlab.errors import LonglabError
    from longlab.eval.runner import EvalConfig, run

    path = _file(tmp_path, "qasper", [ROW])
    out = tmp_path / "out"
    config = EvalConfig(out=str(out), methods=["none"], tasks=[f"jsonl:path={path}"], lengths=[256], samples=1)
    run(config)
    run(config)  # the same file resumes: nothing to do, nothing appended
    assert len((out / "results.jsonl").read_text().splitlines()) == 1
    _file(tmp_path, "qasper", [{**ROW, "answers": ["red"]}])
    with pytest.raises(LonglabError, match=r"'jsonl/qasper' results .* of another task configuration"):
        run(config)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    other = EvalConfig(out=str(out), methods=["none"], tasks=[f"jsonl:path={_file(elsewhere, 'qasper', [ROW])}"],
                       lengths=[256], samples=1)  # fmt: skip
    with pytest.raises(LonglabError, match="of another task configuration"):
        run(other)
