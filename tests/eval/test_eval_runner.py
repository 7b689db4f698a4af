"""The evaluation runner on the bundled model: output folder, resume, pictures, early failures."""

from __future__ import annotations

import json
import struct

import pytest

import longlab
from longlab.eval import runner
from longlab.eval.results import Results
from longlab.eval.runner import EvalConfig, run
from longlab.eval.tasks import parse_task

SMALL = dict(
    methods=["none", "rerope:window=64"],
    tasks=["passkey", "niah:depths=2", "ppl", "ruler:subtasks=niah_single_1;fwe"],
    lengths=[288, 320],  # RULER's niah_single_1 (128 tokens to generate) needs 265 with this tokenizer
    samples=2,
)


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    run(EvalConfig(out=str(out), **SMALL))
    return out


def test_output_folder_has_results_summary_report_and_pictures(finished):
    rows = [json.loads(line) for line in (finished / "results.jsonl").read_text().splitlines()]
    generation = [r for r in rows if "score" in r]
    assert {"prompt_tokens", "expected", "predicted", "score", "latency_s", "peak_memory_mb"} <= set(generation[0])
    assert all(r["prompt_tokens"] <= r["length"] for r in generation)
    assert all(r["device"] == "cpu" and r["dtype"] == "float32" for r in rows)  # the Python default
    (record,) = [json.loads(line) for line in (finished / "runs.jsonl").read_text().splitlines()]
    assert (record["device"], record["dtype"], record["rank"], record["world"]) == ("cpu", "float32", 0, 1)
    # 2 methods x (passkey 2 + niah 2 depths x 2 + ppl 2 + ruler 2 subtasks x 2) x 2 lengths
    assert len(rows) == 2 * (2 + 4 + 2 + 4) * 2
    summary = json.loads((finished / "summary.json").read_text())
    assert summary["methods"] == SMALL["methods"] and summary["lengths"] == [288, 320]
    assert set(summary["tasks"]) == {"passkey", "niah[depths=2]", "ppl", "ruler/niah_single_1", "ruler/fwe"}
    report = (finished / "report.md").read_text()
    for picture in ["passkey.png", "ppl.png", "ppl-by-position.png", "niah-heatmap-niah-depths-2-none.png",
                    "niah-heatmap-niah-depths-2-rerope-window-64.png", "ruler-fwe.png",
                    "ruler-average.png"]:  # fmt: skip
        assert f"]({picture})" in report
        assert (finished / picture).stat().st_size > 5000
    assert _png_size(finished / "passkey.png") == (700, 400)
    assert _png_size(finished / "ppl.png") == (1120, 400)
    assert "| `rerope:window=64` |" in report


def test_interrupted_run_resumes_to_the_same_summary(finished, tmp_path, monkeypatch):
    original = Results.append
    written = {"count": 0}

    def crash_after_seven(self, row):
        if written["count"] == 7:
            raise KeyboardInterrupt
        written["count"] += 1
        original(self, row)

    monkeypatch.setattr(Results, "append", crash_after_seven)
    with pytest.raises(KeyboardInterrupt):
        run(EvalConfig(out=str(tmp_path), **SMALL))
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 7  # nothing lost but the one in flight
    monkeypatch.setattr(Results, "append", original)
    run(EvalConfig(out=str(tmp_path), **SMALL))
    assert (tmp_path / "summary.json").read_text() == (finished / "summary.json").read_text()
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == len((finished / "results.jsonl").read_text().splitlines())  # no cell twice


def test_report_rebuilds_from_results_alone(finished, tmp_path):
    (tmp_path / "results.jsonl").write_text((finished / "results.jsonl").read_text())
    longlab.eval.report.write_report(tmp_path, train_length=512)
    assert (tmp_path / "summary.json").read_text() == (finished / "summary.json").read_text()


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"methods": ["yran:factor=4"]}, "did you mean 'yarn'"),
        ({"tasks": ["passky"]}, "did you mean 'passkey'"),
        ({"methods": ["yarn:factor=2"], "lengths": [2048]}, r"designed for inputs up to 1024 tokens"),
        ({"tasks": ["ruler:subtasks=vt"], "lengths": [48]}, r"task 'ruler/vt' at length 48"),
        ({"tasks": ["ruler:subtasks=vt"], "lengths": [512]}, r"at length 512: RULER vt needs at least \d+ tok"),
        ({"lengths": [10**9]}, "GiB"),
    ],
)
def test_bad_input_fails_before_any_work(tmp_path, overrides, message):
    with pytest.raises(longlab.LonglabError, match=message):
        run(EvalConfig(out=str(tmp_path), **{**SMALL, **overrides}))
    assert not (tmp_path / "results.jsonl").exists()


def test_resuming_in_another_dtype_is_refused_before_any_work(tmp_path):
    from longlab.eval.results import Identity

    identity = Identity.of("tiny", longlab.model_path("tiny"), "bfloat16", 0, False)
    row = {"method": "none", "task": "passkey", "length": 256, "sample": 0, **identity.fields(),
           "fingerprint": identity.fingerprint("none", "passkey", 256)}  # fmt: skip
    (tmp_path / "results.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(longlab.LonglabError, match=r"dtype: 'bfloat16' there, 'float32' here \(resume with --dtype bf"):
        run(EvalConfig(out=str(tmp_path), **SMALL))  # cpu: float32 by default
    assert not (tmp_path / "runs.jsonl").exists()


def test_lengths_parse_with_k_suffix():
    assert [runner.parse_length(x) for x in ("512", "2k", "1.5k")] == [512, 2048, 1536]
    with pytest.raises(longlab.LonglabError, match="token count"):
        runner.parse_length("two")


def test_jsonl_task_truncates_in_the_middle_and_scores_with_the_dataset_metric(tmp_path):
    from transformers import AutoTokenizer

    data = tmp_path / "qasper.jsonl"
    row = {"input": "What colour is the sky?", "context": "start " + "filler " * 2000 + "end",
           "answers": ["blue"], "all_classes": None, "length": 2000}  # fmt: skip
    data.write_text(json.dumps(row) + "\n")
    task = parse_task(f"jsonl:path={data}")
    assert task.chosen_metric() == "qa_f1"
    tokenizer = AutoTokenizer.from_pretrained(longlab.model_path("tiny"))
    (sample,) = task.samples("jsonl/qasper", tokenizer, 600, 1, 0)
    assert len(tokenizer(sample.prompt, add_special_tokens=False)["input_ids"]) <= 600 - 128 + 2  # qasper: 128 new
    assert sample.prompt.startswith("You are given a scientific article") and "start filler" in sample.prompt
    assert sample.prompt.endswith("Question: What colour is the sky?\n\nAnswer:")  # LongBench's qasper prompt
    assert task.score("jsonl/qasper", "Blue.", sample) == 100.0


def test_torchrun_splits_cells_across_processes_into_the_same_summary(tmp_path):
    """Two processes under torchrun share one folder and write the summary one process writes."""
    import os
    import subprocess
    import sys

    args = ["eval", "--device", "cpu", "--method", "none", "--method", "rerope:window=64", "--task", "passkey",
            "--task", "ppl", "--lengths", "256", "--samples", "2"]  # fmt: skip
    single, split = tmp_path / "single", tmp_path / "split"
    from longlab.cli import main

    assert main([*args, "--out", str(single)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "longlab.cli", *args, "--out", str(split)]  # fmt: skip
    subprocess.run(command, check=True, env=env, capture_output=True, timeout=600)
    rows = [json.loads(line) for line in (split / "results.jsonl").read_text().splitlines()]
    assert len(rows) == len((single / "results.jsonl").read_text().splitlines())
    assert {json.loads(line)["rank"] for line in (split / "runs.jsonl").read_text().splitlines()} == {0, 1}
    assert {r["cell"] for r in rows} == {0, 1, 2, 3} and all(r["dtype"] == "float32" for r in rows)
    assert (split / "summary.json").read_bytes() == (single / "summary.json").read_bytes()


def test_chat_prompts_fit_the_length_with_the_template_around_them():
    from transformers import AutoTokenizer

    from longlab.eval.runner import Cell, _prepare_samples
    from longlab.generation import encode

    tokenizer = AutoTokenizer.from_pretrained(longlab.model_path("tiny"))
    tokenizer.chat_template = (
        "{% for m in messages %}<|system|> You are a careful assistant who answers briefly.\n"
        "<|user|> {{ m['content'] }}\n{% endfor %}<|assistant|>"
    )
    tasks = [parse_task("passkey"), parse_task("niah:depths=2")]
    cells = [Cell("none", task, task.name, task.label(), 300, 2, task.name) for task in tasks]
    prepared = _prepare_samples(cells, tokenizer, seed=0, chat=True, show=False)
    for cell in cells:
        for sample in prepared[cell.label, 300]:
            wrapped = encode(tokenizer, sample.prompt, chat=True).shape[1]
            assert wrapped + cell.task.new_tokens(cell.subtask) <= 300, (cell.label, wrapped)
