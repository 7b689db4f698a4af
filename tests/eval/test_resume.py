"""Resume keyed by configuration (issue 11): one configuration per results folder, task parameters
in the key, perplexity spans independent of the sample count, torn lines, one eval per folder."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import longlab
from longlab.eval.report import write_report
from longlab.eval.runner import EvalConfig, run

TINY = dict(methods=["none"], tasks=["passkey"], lengths=[128], samples=2)


def _rows(folder):
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "base"
    run(EvalConfig(out=str(out), **TINY))
    return out


@pytest.fixture
def copy(base, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(base, out)
    return out


@pytest.mark.parametrize(
    "change,message",
    [
        ({"seed": 1}, r"seed: 0 there, 1 here \(resume with --seed 0\)"),
        ({"dtype": "bfloat16"}, r"dtype: 'float32' there, 'bfloat16' here \(resume with --dtype float32\)"),
    ],
)
def test_another_configuration_is_refused_naming_what_differs(copy, change, message):
    before = (copy / "results.jsonl").read_text()
    with pytest.raises(longlab.LonglabError, match=message) as error:
        run(EvalConfig(out=str(copy), **{**TINY, **change}))
    assert "fresh --out" in str(error.value)
    assert (copy / "results.jsonl").read_text() == before  # old numbers are never reported as new


def test_another_model_with_the_same_name_of_file_is_refused(copy, tmp_path):
    """A checkpoint elsewhere (here: the bundled model's files, one weight byte changed) is another model."""
    model = tmp_path / "model"
    shutil.copytree(longlab.model_path("tiny"), model)
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(longlab.LonglabError, match=r"model: 'tiny' there, .* here.*model_digest: '[0-9a-f]+' there"):
        run(EvalConfig(out=str(copy), **{**TINY, "model": str(model)}))


def test_rows_from_before_fingerprints_are_refused(tmp_path):
    row = {"method": "none", "task": "passkey", "length": 128, "sample": 0, "dtype": "float32", "score": 0.0}
    (tmp_path / "results.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(longlab.LonglabError, match=r"written before longlab recorded .* fresh --out"):
        run(EvalConfig(out=str(tmp_path), **TINY))
    assert not (tmp_path / "runs.jsonl").exists()


def test_task_parameters_are_part_of_the_key(copy):
    """passkey:digits=7 into a folder with passkey results measures digits=7; both stay apart."""
    run(EvalConfig(out=str(copy), **{**TINY, "tasks": ["passkey", "passkey:digits=7"], "samples": 1}))
    rows = _rows(copy)
    seven = [r for r in rows if r["task"] == "passkey[digits=7]"]
    assert len(seven) == 1 and len(seven[0]["expected"][0]) == 7 and seven[0]["task_spec"] == "passkey:digits=7"
    assert len([r for r in rows if r["task"] == "passkey"]) == 2  # nothing measured twice
    assert len({r["fingerprint"] for r in rows}) == 2
    summary = json.loads((copy / "summary.json").read_text())
    assert list(summary["tasks"]) == ["passkey", "passkey[digits=7]"]
    assert summary["configuration"]["tasks"] == {"passkey": "passkey", "passkey[digits=7]": "passkey:digits=7"}


def test_perplexity_span_of_a_sample_does_not_depend_on_the_count(monkeypatch):
    """Sample 1 of 2 and sample 1 of 3 read the same held-out span, so resuming with more samples
    measures what a fresh run does."""
    import torch

    from longlab.eval import generation
    from longlab.eval.tasks import CellContext, parse_task

    def losses_of_the_tokens(model, ids, chunk=1024):  # stands in for the model: the loss is the token id
        return ids[0, 1:].double()

    monkeypatch.setattr(generation, "token_losses", losses_of_the_tokens)

    class HeldOut:
        def tokens(self):
            return np.arange(5000)

    class Model:
        device = torch.device("cpu")

    task = parse_task("ppl")
    measured = []
    for count in (2, 3):
        cell = CellContext(Model(), None, "ppl", 128, count, None, False, 1, HeldOut())
        (([_index], [row]),) = list(task.measure(cell, [1]))
        measured.append(row["loss_whole"])
    assert measured[0] == measured[1]


def test_torn_last_line_is_dropped_and_the_resume_does_not_glue_onto_it(copy, capfd):
    text = (copy / "results.jsonl").read_text()
    last = text.splitlines()[-1]
    (copy / "results.jsonl").write_text(text[: len(text) - len(last) // 2 - 1])  # a write cut short
    write_report(copy)  # the report reads every whole line
    assert "torn" in capfd.readouterr().err
    assert json.loads((copy / "summary.json").read_text())["tasks"]["passkey"]["none"]["128"]["n"] == 1
    run(EvalConfig(out=str(copy), **TINY))
    err = capfd.readouterr().err
    assert "torn last line" in err and "preparing prompts" in err
    rows = _rows(copy)  # every line whole JSON
    assert sorted(r["sample"] for r in rows) == [0, 1]
    assert json.loads((copy / "summary.json").read_text())["tasks"]["passkey"]["none"]["128"]["n"] == 2


def test_a_second_eval_on_a_locked_folder_names_the_holder(copy):
    from longlab.eval.results import FolderLock

    before = (copy / "results.jsonl").read_text()
    with FolderLock(copy), pytest.raises(longlab.LonglabError, match=r"in use by another longlab eval \(pid \d+ on"):
        run(EvalConfig(out=str(copy), **{**TINY, "samples": 3}))
    assert (copy / "results.jsonl").read_text() == before
    with FolderLock(copy):  # released after the refused run, and after the holder's exit
        pass
