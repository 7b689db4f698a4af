"""Reports from results alone (issue 11): NaN never crashes and summary.json stays strict JSON; the
report names the configuration; RULER's average over its subtasks; plots keep every method visible."""

from __future__ import annotations

import json
import math

import pytest

from longlab.eval import plots
from longlab.eval.report import summarize, write_report

IDENTITY = {"model": "tiny", "model_digest": "0123456789abcdef", "tokenizer_digest": "fedcba9876543210",
            "dtype": "float32", "seed": 3, "chat": False, "longlab": "0.1.0"}  # fmt: skip


def _row(method, task, length, sample, spec, **values):
    return {"method": method, "task": task, "length": length, "sample": sample, "cell": 0, "latency_s": 0.1,
            "peak_memory_mb": 10.0, "task_spec": spec, "fingerprint": f"{method}/{task}/{length}", **IDENTITY,
            **values}  # fmt: skip


def _strict(text):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def folder(tmp_path):
    rows = []
    for method in ("none", "yarn:factor=4.0,beta_fast=32.0,beta_slow=1.0"):
        for length in (256, 512):
            for sample in range(2):
                rows.append(_row(method, "passkey[digits=7]", length, sample, "passkey:digits=7", kind="generation",
                                 score=100.0 * sample, depth=0.5))  # fmt: skip
                rows.append(_row(method, "ruler/vt", length, sample, "ruler:subtasks=vt;cwe", kind="generation",
                                 score=50.0, depth=None))  # fmt: skip
                rows.append(_row(method, "ruler/cwe", length, sample, "ruler:subtasks=vt;cwe", kind="generation",
                                 score=10.0 * (length // 256), depth=None))  # fmt: skip
                loss = float("nan") if method == "none" and length == 512 else 2.0
                sliding = None if loss != loss else 1.5
                rows.append(_row(method, "ppl", length, sample, "ppl", kind="perplexity", loss_whole=loss,
                                 loss_sliding=sliding, position_loss=[loss, 1.0, None]))  # fmt: skip
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_nan_results_give_a_report_and_strict_json(folder):
    report = write_report(folder, train_length=512).read_text()
    summary = _strict((folder / "summary.json").read_text())
    _strict((folder / "cost.json").read_text())
    assert summary["tasks"]["ppl"]["none"]["512"]["ppl_whole"] is None
    assert summary["tasks"]["ppl"]["none"]["256"]["ppl_whole"] == pytest.approx(math.exp(2.0), abs=1e-3)
    assert "| `none` | 7.39 | NaN |" in report


def test_report_names_model_dtype_seed_and_task_parameters(folder):
    report = write_report(folder).read_text()
    assert "Model: `tiny`" in report and "0123456789abcdef" in report
    assert "dtype **float32**" in report and "seed **3**" in report
    assert "| passkey[digits=7] | `passkey:digits=7` | digits=7, depths=0 |" in report
    assert "## passkey[digits=7]" in report
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["configuration"]["seed"] == 3 and summary["configuration"]["dtype"] == "float32"


def test_ruler_average_over_its_subtasks(folder):
    report = write_report(folder).read_text()
    average = json.loads((folder / "summary.json").read_text())["ruler_average"]["ruler"]
    assert average["subtasks"] == ["ruler/vt", "ruler/cwe"]
    assert average["score"]["none"] == {"256": 30.0, "512": 35.0}  # (50 + 10) / 2, (50 + 20) / 2
    assert average["avg"]["none"] == 32.5
    assert average["wavg_inc"]["none"] == pytest.approx((30 + 2 * 35) / 3, abs=0.01)
    assert "| method | 256 | 512 | avg | wAvg (inc) | wAvg (dec) |" in report
    assert "| `none` | 30.0 | 35.0 | 32.5 | 33.3 | 31.7 |" in report
    assert (folder / "ruler-average.png").stat().st_size > 5000


def test_plots_keep_every_method_visible_with_the_legend_off_the_data():
    table = {m: {"256": {"score": 0.0}, "512": {"score": 0.0}} for m in ("none", "linear", "ntk", "yarn")}
    fig = plots.score_figure("passkey", table, 512)
    fig.canvas.draw()
    (ax,) = fig.axes
    lines = [line for line in ax.get_lines() if line.get_label() in table]
    assert len({(line.get_marker(), line.get_linestyle()) for line in lines}) == 4  # identical curves, told apart
    assert len({line.get_markersize() for line in lines}) == 4  # nested markers: each one shows
    (legend,) = fig.legends
    renderer = fig.canvas.get_renderer()
    box, axes_box = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
    assert box.x0 >= axes_box.x1  # beside the axes, not on the data
    assert box.x1 <= fig.bbox.x1 + 1  # and inside the picture


def test_summary_from_rows_before_fingerprints_still_reads(folder):
    rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    old = [{k: v for k, v in r.items() if k not in (*IDENTITY, "fingerprint", "task_spec")} for r in rows]
    summary, _ = summarize(old)
    assert summary["tasks"]["passkey[digits=7]"]["none"]["256"]["score"] == 50.0
