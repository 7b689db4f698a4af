"""Reports built from ``results.jsonl`` alone: ``summary.json`` (quality), ``cost.json`` (latency and
memory), ``report.md`` with one table per task, and the pictures it embeds."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from longlab.errors import LonglabError
from longlab.eval import plots
from longlab.eval.results import IDENTITY_FIELDS, read_rows, row_key, strict_json
from longlab.eval.tasks import parse_task
from longlab.eval.tasks.base import base_name, group_of, task_fields


def read_results(folder: Path) -> list[dict]:
    """The rows of a results folder, each (fingerprint, sample) once (the first write wins), in the
    run's own order; a torn line is dropped with a warning."""
    path = Path(folder) / "results.jsonl"
    if not path.exists():
        raise LonglabError(f"{folder} has no results.jsonl; run `longlab eval --out {folder}` first")
    rows: dict[tuple, dict] = {}
    for row in read_rows(Path(folder)):
        rows.setdefault(row_key(row), row)
    found = list(rows.values())
    if all("cell" in row for row in found):  # the run's own order, whichever process wrote a row first
        found.sort(key=lambda row: (row["cell"], row["sample"]))
    return found


def _values(rows: list[dict], key: str) -> np.ndarray:
    """A numeric column as floats; a missing or null value (a NaN written as null) is NaN."""
    return np.array([r.get(key) for r in rows], dtype=float)


def _mean(values) -> float:
    values = np.asarray(values, dtype=float)
    return float(values.mean()) if values.size else math.nan


def _ordered(values) -> list:
    return list(dict.fromkeys(values))


def summarize(rows: list[dict], train_length: int | None = None) -> tuple[dict, dict]:
    """(summary, cost): the configuration; mean scores / perplexities per method, task and length;
    RULER's average over its subtasks; NIAH depth grids; position-loss curves; and mean latency /
    peak memory per cell. Values may be NaN (a NaN loss); :func:`strict_json` writes them as null."""
    methods = _ordered(r["method"] for r in rows)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["method"], row["task"], row["length"]].append(row)
    lengths = sorted({r["length"] for r in rows})
    summary: dict = {"train_length": train_length, "configuration": configuration(rows), "methods": methods,
                     "lengths": lengths, "tasks": {}}  # fmt: skip
    cost: dict = {}
    with np.errstate(all="ignore"):
        for task in _ordered(r["task"] for r in rows):
            table: dict = {}
            for method in methods:
                for length in lengths:
                    cell = groups.get((method, task, length))
                    if not cell:
                        continue
                    entry = {"n": len(cell)}
                    if cell[0].get("kind", "perplexity" if "loss_whole" in cell[0] else "generation") == "perplexity":
                        entry["ppl_whole"] = round(float(np.exp(_mean(_values(cell, "loss_whole")))), 4)
                        entry["ppl_sliding"] = round(float(np.exp(_mean(_values(cell, "loss_sliding")))), 4)
                        curve = np.array([r["position_loss"] for r in cell], dtype=float).mean(axis=0)
                        entry["position_loss"] = [round(float(x), 4) for x in curve]
                    else:
                        entry["score"] = round(_mean(_values(cell, "score")), 2)
                    table.setdefault(method, {})[str(length)] = entry
                    peaks = [r.get("peak_memory_mb") for r in cell]
                    cost.setdefault(method, {}).setdefault(task, {})[str(length)] = {
                        "latency_s": round(_mean(_values(cell, "latency_s")), 4),
                        "peak_memory_mb": max((p for p in peaks if p is not None and p == p), default=0),
                    }
            summary["tasks"][task] = table
        summary["ruler_average"] = _ruler_averages(summary["tasks"], methods, lengths)
        summary["niah_grid"] = _niah_grids(rows, methods)
    return summary, cost


def configuration(rows: list[dict]) -> dict:
    """What the rows were measured with: model, digests, dtype, seed, chat, longlab version (one value
    each, or the list of values when a folder from before fingerprints mixes them), and each task's
    spec by its label."""
    out: dict = {}
    for name in IDENTITY_FIELDS:
        values = _ordered(r[name] for r in rows if r.get(name) is not None)
        if values:
            out[name] = values[0] if len(values) == 1 else values
    specs: dict = {}
    for row in rows:
        if "task_spec" in row:
            specs.setdefault(group_of(row["task"]), row["task_spec"])
    out["tasks"] = specs
    return out


def _ruler_averages(tasks: dict, methods: list[str], lengths: list[int]) -> dict:
    """RULER's headline numbers: at each length, the mean score over the RULER subtasks (only where
    every subtask of the run was measured), and over the lengths the plain average and RULER's
    weighted averages, with weights growing (``wavg_inc``) or shrinking (``wavg_dec``) with length."""
    out: dict = {}
    for group in _ordered(group_of(t) for t in tasks if base_name(t) == "ruler"):
        subtasks = [t for t in tasks if group_of(t) == group]
        score: dict = {}
        for method in methods:
            for length in lengths:
                entries = [tasks[t].get(method, {}).get(str(length)) for t in subtasks]
                if all(e is not None for e in entries):
                    score.setdefault(method, {})[str(length)] = round(_mean([e["score"] for e in entries]), 2)
        avg, inc, dec = {}, {}, {}
        for method, by_length in score.items():
            values = [by_length[str(n)] for n in lengths if str(n) in by_length]
            weights = np.arange(1, len(values) + 1, dtype=float)
            avg[method] = round(_mean(values), 2)
            inc[method] = round(float(np.average(values, weights=weights)), 2)
            dec[method] = round(float(np.average(values, weights=weights[::-1])), 2)
        out[group] = {"subtasks": subtasks, "score": score, "avg": avg, "wavg_inc": inc, "wavg_dec": dec}
    return out


def _niah_grids(rows: list[dict], methods: list[str]) -> dict:
    """{task label: {method: depth x length grid}} for every needle-in-a-haystack task of the run."""
    grids: dict = {}
    for label in _ordered(r["task"] for r in rows if base_name(r["task"]) == "niah"):
        for method in methods:
            cells = [r for r in rows if r["method"] == method and r["task"] == label]
            if not cells:
                continue
            depths = sorted({round(r["depth"], 4) for r in cells})
            lengths = sorted({r["length"] for r in cells})
            grid = [
                [round(_mean(_values([r for r in cells if round(r["depth"], 4) == d and r["length"] == n], "score")), 2)
                 for n in lengths]
                for d in depths
            ]  # fmt: skip
            grids.setdefault(label, {})[method] = {"depths": depths, "lengths": lengths, "score": grid}
    return grids


def _number(value, fmt: str) -> str:
    return "NaN" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def _table(table: dict, lengths: list[int], key: str, fmt: str) -> list[str]:
    present = [n for n in lengths if any(str(n) in row for row in table.values())]
    lines = [f"| method | {' | '.join(str(n) for n in present)} |", "|---" * (len(present) + 1) + "|"]
    for method, row in table.items():
        cells = [_number(row[str(n)][key], fmt) if str(n) in row else "—" for n in present]
        lines.append(f"| `{method}` | {' | '.join(cells)} |")
    return lines


def _parameters(spec: str) -> str:
    """A task's every parameter with its value, defaults included (the spec alone if it no longer parses)."""
    try:
        task = parse_task(spec)
    except LonglabError:
        return f"`{spec}`"
    values = {name: getattr(task, field) for name, field in task_fields(type(task)).items()}
    return ", ".join(f"{k}={_shorten(repr(v) if isinstance(v, str) else str(v))}" for k, v in values.items()) or "—"


def _shorten(text: str, limit: int = 48) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _configuration_lines(summary: dict) -> list[str]:
    config = summary.get("configuration") or {}
    if not any(k in config for k in IDENTITY_FIELDS):
        return ["Configuration: not recorded (results written before longlab recorded it).", ""]
    chat = config.get("chat")
    lines = [
        f"Model: `{config.get('model', '?')}` (weights digest `{config.get('model_digest', '?')}`, tokenizer "
        f"digest `{config.get('tokenizer_digest', '?')}`); dtype **{config.get('dtype', '?')}**; seed "
        f"**{config.get('seed', '?')}**; prompts {'in the chat template' if chat else 'as plain text'}; "
        f"longlab {config.get('longlab', '?')}.",
        "",
    ]
    if config.get("tasks"):
        lines += ["| task | spec | parameters |", "|---|---|---|"]
        lines += [f"| {label} | `{spec}` | {_parameters(spec)} |" for label, spec in config["tasks"].items()]
        lines.append("")
    return lines


def _ruler_lines(group: str, average: dict, lengths: list[int]) -> list[str]:
    present = [n for n in lengths if any(str(n) in row for row in average["score"].values())]
    lines = [f"## {group}: average over its {len(average['subtasks'])} subtasks", "",
             "Mean score (0-100) over " + ", ".join(s.split("/", 1)[-1] for s in average["subtasks"]) + " at each "
             "length, as RULER reports it; avg: over the lengths; wAvg: weighted by the length's rank, growing "
             "(inc) or shrinking (dec):", "",
             f"| method | {' | '.join(str(n) for n in present)} | avg | wAvg (inc) | wAvg (dec) |",
             "|---" * (len(present) + 4) + "|"]  # fmt: skip
    for method, row in average["score"].items():
        cells = [_number(row[str(n)], "{:.1f}") if str(n) in row else "—" for n in present]
        cells += [_number(average[k][method], "{:.1f}") for k in ("avg", "wavg_inc", "wavg_dec")]
        lines.append(f"| `{method}` | {' | '.join(cells)} |")
    return [*lines, ""]


def write_report(folder: Path, train_length: int | None = None) -> Path:
    """Write summary.json, cost.json, the pictures and report.md under ``folder``."""
    folder = Path(folder)
    rows = read_results(folder)
    if not rows:
        raise LonglabError(f"{folder}/results.jsonl holds no whole row yet; nothing to report")
    if train_length is None:
        runs = folder / "runs.jsonl"
        train_length = json.loads(runs.read_text().splitlines()[0]).get("train_length") if runs.exists() else None
    summary, cost = summarize(rows, train_length)
    (folder / "summary.json").write_text(strict_json(summary, indent=1))  # NaN as null: strict JSON
    (folder / "cost.json").write_text(strict_json(cost, indent=1))
    pictures = plots.draw_all(folder, summary)

    lengths = summary["lengths"]
    lines = ["# longlab evaluation report", "", *_configuration_lines(summary)]
    if train_length:
        lines += [f"Training length of the model: **{train_length}** tokens. Lengths are in the model's own "
                  "tokens, template and generation budget included.", ""]  # fmt: skip
    averaged = set()
    for task, table in summary["tasks"].items():
        group = group_of(task)
        if group in summary["ruler_average"] and group not in averaged:
            averaged.add(group)
            lines += _ruler_lines(group, summary["ruler_average"][group], lengths)
            lines += [f"![{name}]({name})" for name in pictures.get(group, [])] + [""]
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
            latency, peak = _number(entry["latency_s"], "{:.3f}"), _number(entry["peak_memory_mb"], "{:.0f}")
            lines.append(f"| `{method}` | {task} | {longest} | {latency} | {peak} |")
    (folder / "report.md").write_text("\n".join(lines) + "\n")
    return folder / "report.md"
