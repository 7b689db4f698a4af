"""Reports built from ``results.jsonl`` alone: ``summary.json`` (quality), ``cost.json`` (latency and
memory), ``report.md`` with one table per task, and the pictures it embeds."""

from __future__ import annotations

import fcntl
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from longlab.errors import LonglabError
from longlab.eval import plots


def read_results(folder: Path) -> list[dict]:
    path = Path(folder) / "results.jsonl"
    if not path.exists():
        raise LonglabError(f"{folder} has no results.jsonl; run `longlab eval --out {folder}` first")
    with path.open() as f:
        fcntl.flock(f, fcntl.LOCK_SH)  # never half a line another process is appending
        text = f.read()
    rows: dict[tuple, dict] = {}
    for line in text.splitlines():
        if line.strip():
            row = json.loads(line)
            rows.setdefault((row["method"], row["task"], row["length"], row["sample"]), row)  # first write wins
    found = list(rows.values())
    if all("cell" in row for row in found):  # the run's own order, whichever process wrote a row first
        found.sort(key=lambda row: (row["cell"], row["sample"]))
    return found


def _ordered(values) -> list:
    return list(dict.fromkeys(values))


def summarize(rows: list[dict], train_length: int | None = None) -> tuple[dict, dict]:
    """(summary, cost): mean scores / perplexities per method, task and length; NIAH depth grids;
    position-loss curves; and mean latency / peak memory per cell."""
    methods = _ordered(r["method"] for r in rows)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["method"], row["task"], row["length"]].append(row)
    lengths = sorted({r["length"] for r in rows})
    summary: dict = {"train_length": train_length, "methods": methods, "lengths": lengths, "tasks": {}}
    cost: dict = {}
    for task in _ordered(r["task"] for r in rows):
        table: dict = {}
        for method in methods:
            for length in lengths:
                cell = groups.get((method, task, length))
                if not cell:
                    continue
                entry = {"n": len(cell)}
                if cell[0].get("kind", "perplexity" if "loss_whole" in cell[0] else "generation") == "perplexity":
                    entry["ppl_whole"] = round(math.exp(np.mean([r["loss_whole"] for r in cell])), 4)
                    entry["ppl_sliding"] = round(math.exp(np.mean([r["loss_sliding"] for r in cell])), 4)
                    curve = np.mean([r["position_loss"] for r in cell], axis=0)
                    entry["position_loss"] = [round(float(x), 4) for x in curve]
                else:
                    entry["score"] = round(float(np.mean([r["score"] for r in cell])), 2)
                table.setdefault(method, {})[str(length)] = entry
                cost.setdefault(method, {}).setdefault(task, {})[str(length)] = {
                    "latency_s": round(float(np.mean([r["latency_s"] for r in cell])), 4),
                    "peak_memory_mb": max((r["peak_memory_mb"] or 0) for r in cell),
                }
        summary["tasks"][task] = table
    summary["niah_grid"] = _niah_grids(rows, methods)
    return summary, cost


def _niah_grids(rows: list[dict], methods: list[str]) -> dict:
    grids = {}
    for method in methods:
        cells = [r for r in rows if r["method"] == method and r["task"] == "niah"]
        if not cells:
            continue
        depths = sorted({round(r["depth"], 4) for r in cells})
        lengths = sorted({r["length"] for r in cells})
        grid = [
            [
                round(float(np.mean([r["score"] for r in cells if round(r["depth"], 4) == d and r["length"] == n]
                                    or [float("nan")])), 2)
                for n in lengths
            ]
            for d in depths
        ]  # fmt: skip
        grids[method] = {"depths": depths, "lengths": lengths, "score": grid}
    return grids


def _table(table: dict, lengths: list[int], key: str, fmt: str) -> list[str]:
    present = [n for n in lengths if any(str(n) in row for row in table.values())]
    lines = [f"| method | {' | '.join(str(n) for n in present)} |", "|---" * (len(present) + 1) + "|"]
    for method, row in table.items():
        cells = [fmt.format(row[str(n)][key]) if str(n) in row else "—" for n in present]
        lines.append(f"| `{method}` | {' | '.join(cells)} |")
    return lines


def write_report(folder: Path, train_length: int | None = None) -> Path:
    """Write summary.json, cost.json, the pictures and report.md under ``folder``."""
    folder = Path(folder)
    rows = read_results(folder)
    if train_length is None:
        runs = folder / "runs.jsonl"
        train_length = json.loads(runs.read_text().splitlines()[0]).get("train_length") if runs.exists() else None
    summary, cost = summarize(rows, train_length)
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    (folder / "cost.json").write_text(json.dumps(cost, indent=1))
    pictures = plots.draw_all(folder, summary)

    lengths = summary["lengths"]
    lines = ["# longlab evaluation report", ""]
    if train_length:
        lines += [f"Training length of the model: **{train_length}** tokens. Lengths are in the model's own "
                  "tokens, template and generation budget included.", ""]  # fmt: skip
    for task, table in summary["tasks"].items():
        first = next(iter(next(iter(table.values())).values()))
        lines += [f"## {task}", ""]
        if "ppl_whole" in first:
            lines += ["Perplexity of held-out text, whole window:", ""]
            lines += [*_table(table, lengths, "ppl_whole", "{:.2f}"), ""]
            lines += ["Sliding window (each token scored once with at least 3/4 of the window as context):", ""]
            lines += [*_table(table, lengths, "ppl_sliding", "{:.2f}"), ""]
        else:
            lines += ["Mean score (0-100):", "", *_table(table, lengths, "score", "{:.1f}"), ""]
        lines += [f"![{name}]({name})" for name in pictures.get(task, [])] + [""]
    lines += ["## Cost", "", "Mean latency per sample (s) and peak memory (MiB; CPU: resident, GPU: allocated), "
              "per method, at the longest length measured for each task:", "",
              "| method | task | length | latency (s) | peak memory (MiB) |", "|---|---|---|---|---|"]  # fmt: skip
    for method, tasks in cost.items():
        for task, by_length in tasks.items():
            longest = max(by_length, key=int)
            entry = by_length[longest]
            lines.append(
                f"| `{method}` | {task} | {longest} | {entry['latency_s']:.3f} | {entry['peak_memory_mb']:.0f} |"
            )
    (folder / "report.md").write_text("\n".join(lines) + "\n")
    return folder / "report.md"
