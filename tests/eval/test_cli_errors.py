"""Bad input to `longlab eval` and `longlab report`: one clear line, exit status 2, no traceback;
Ctrl-C: exit 130 with how to resume."""

from __future__ import annotations

import json
import shutil

import pytest

import longlab
from longlab.cli import main

FAST = ["--method", "none", "--task", "passkey", "--lengths", "128", "--samples", "1"]


def _fails(capsys, argv, message):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err
    err = err.splitlines()[-1].split("\r")[-1]  # after any progress bar of transformers
    assert err.startswith("longlab: error: ")
    assert message in err, err
    return err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--samples", "0"], "--samples must be a positive"),
        (["--samples", "-3"], "--samples must be a positive"),
        (["--batch-size", "0"], "--batch-size must be a positive"),
        (["--batch-size", "-1"], "--batch-size must be a positive"),
        (["--lengths", ""], "--lengths must be comma-separated token counts"),
        (["--lengths", "128,,256"], "--lengths must be comma-separated token counts"),
    ],
)
def test_bad_numbers_fail_in_one_line(tmp_path, capsys, args, message):
    _fails(capsys, ["eval", *FAST, *args, "--out", str(tmp_path / "out")], message)
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_out_that_is_a_file_or_cannot_be_made_fails(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    _fails(capsys, ["eval", *FAST, "--out", str(a_file)], "is a file")
    _fails(capsys, ["eval", *FAST, "--out", str(a_file / "below")], "cannot be created")


def test_missing_model_and_incomplete_model_folders_fail(tmp_path, capsys):
    out = str(tmp_path / "out")
    _fails(capsys, ["eval", *FAST, "--model", str(tmp_path / "nowhere"), "--out", out], "nor an existing folder")
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(longlab.model_path("tiny") / "config.json", folder)
    _fails(capsys, ["eval", *FAST, "--model", str(folder), "--out", out], "no weights")
    shutil.copy(longlab.model_path("tiny") / "model.safetensors", folder)
    _fails(capsys, ["eval", *FAST, "--model", str(folder), "--out", out], "no tokenizer")


def test_empty_haystack_folder_fails(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = str(tmp_path / "out")
    base = ["eval", "--method", "none", "--lengths", "128", "--samples", "1", "--out", out]
    _fails(capsys, [*base, "--task", f"niah:haystack={empty}"], "holds no .txt files")
    (empty / "a.txt").write_text("")
    _fails(capsys, [*base, "--task", f"niah:haystack={empty}"], "holds no sentence")


def test_chat_without_a_chat_template_fails_before_work(tmp_path, capsys):
    _fails(capsys, ["eval", *FAST, "--chat", "--out", str(tmp_path)], "has none; drop --chat")
    assert not (tmp_path / "results.jsonl").exists()


def test_chat_encoding_gives_token_ids():
    from transformers import AutoTokenizer

    from longlab.generation import encode

    tokenizer = AutoTokenizer.from_pretrained(longlab.model_path("tiny"))
    tokenizer.chat_template = "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Assistant:"
    ids = encode(tokenizer, "What is the pass key?", chat=True)
    assert ids.ndim == 2 and ids.shape[0] == 1
    assert tokenizer.decode(ids[0]) == "User: What is the pass key?\nAssistant:"


def test_ctrl_c_says_how_to_resume(tmp_path, capsys, monkeypatch):
    from longlab.eval import runner

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run", interrupted)
    assert main(["eval", *FAST, "--out", str(tmp_path)]) == 130
    assert "interrupted; rerun the same command to resume" in capsys.readouterr().err


def test_report_of_a_folder_without_results_fails(tmp_path, capsys):
    _fails(capsys, ["report", str(tmp_path)], "has no results.jsonl")


def test_report_survives_a_torn_last_line(tmp_path, capsys):
    row = {"method": "none", "task": "passkey", "length": 128, "sample": 0, "kind": "generation", "score": 100.0,
           "latency_s": 0.1, "peak_memory_mb": 1.0}  # fmt: skip
    (tmp_path / "results.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(row)[:20])
    assert main(["report", str(tmp_path)]) == 0
    assert "torn" in capsys.readouterr().err
