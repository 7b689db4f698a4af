"""``longlab lab`` end to end at toy sizes: it trains, measures, writes report.md and the plot; a
killed run resumes to the same weights as an uninterrupted one and only appends to results.jsonl."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from longlab import cli
from longlab.errors import LonglabError
from longlab.lab import run as lab_run
from longlab.lab.run import LabConfig

CONFIG = LabConfig(
    components=("nope", "alibi"), size="tiny", vocab_size=0, length=16, steps=4, batch_size=2,
    ppl_windows=1, passkey_samples=0, multiples=(1, 2), checkpoint_every=2,
)  # fmt: skip


@pytest.fixture(autouse=True)
def small_text(monkeypatch):
    """A few thousand real tokens instead of the whole corpus (building it takes minutes)."""
    tok = lab_run.tokenizer(None, CONFIG)
    text = " ".join(["The grass is green. The sky is blue.", "def add(a, b):\n    return a + b\n"] * 200)
    ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int32)
    monkeypatch.setattr(lab_run, "_tokens", lambda out, tok, split: ids)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lab_writes_a_report(tmp_path):
    report = lab_run.run(tmp_path, CONFIG)
    text = report.read_text()
    assert "| `nope` |" in text and "| `alibi:scale=1.0` |" in text and "32 (2x)" in text
    assert (tmp_path / "perplexity.png").stat().st_size > 0
    rows = _rows(tmp_path / "results.jsonl")
    kinds = sorted((r["component"], r["kind"], r.get("length")) for r in rows)
    assert kinds == sorted(
        [(c, "train", None) for c in ("nope", "alibi:scale=1.0")]
        + [(c, "ppl", n) for c in ("nope", "alibi:scale=1.0") for n in (16, 32)]
    )
    assert all(r["tokens_per_s"] > 0 and r["final_loss"] > 0 for r in rows if r["kind"] == "train")


def test_a_killed_run_resumes_to_the_same_model(tmp_path, monkeypatch):
    fresh = tmp_path / "fresh"
    lab_run.run(fresh, CONFIG)

    killed = tmp_path / "killed"
    original = lab_run.Batches.__call__

    def dies_at_step_3(self, step):
        if step == 3:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(lab_run.Batches, "__call__", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        lab_run.run(killed, CONFIG)
    monkeypatch.setattr(lab_run.Batches, "__call__", original)
    before = (killed / "results.jsonl").read_text() if (killed / "results.jsonl").exists() else ""
    lab_run.run(killed, CONFIG)
    after = (killed / "results.jsonl").read_text()
    assert after.startswith(before)  # appended, never rewritten
    for name in ("nope", "alibi-scale-1-0"):
        a = torch.load(fresh / "models" / name / "model.pt")
        b = torch.load(killed / "models" / name / "model.pt")
        assert all(torch.equal(a[k], b[k]) for k in a)  # deterministic: same weights as uninterrupted
    ppl = {(r["component"], r["length"]): r["ppl"] for r in _rows(fresh / "results.jsonl") if r["kind"] == "ppl"}
    again = {(r["component"], r["length"]): r["ppl"] for r in _rows(killed / "results.jsonl") if r["kind"] == "ppl"}
    assert ppl == again

    # a finished run reruns without any new row
    lab_run.run(killed, CONFIG)
    assert (killed / "results.jsonl").read_text() == after


def test_another_configuration_in_the_same_folder_is_refused(tmp_path):
    lab_run.run(tmp_path, CONFIG)
    with pytest.raises(LonglabError, match="another configuration"):
        lab_run.run(tmp_path, LabConfig(**{**CONFIG.__dict__, "steps": 5}))


def test_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lab_run, "LabConfig", lambda **kw: LabConfig(**{**CONFIG.__dict__, **kw}))
    code = cli.main(
        ["lab", "--component", "rope", "--steps", "2", "--length", "16", "--out", str(tmp_path), "--device", "cpu"]
    )
    assert code in (0, None)
    assert "report:" in capsys.readouterr().out and (tmp_path / "report.md").exists()
    assert cli.main(["lab", "--preset", "nonsense", "--out", str(tmp_path / "x"), "--device", "cpu"]) == 2
