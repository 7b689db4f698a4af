"""The report's pictures (matplotlib, headless): NIAH heatmaps in the red -> yellow -> green
convention of the well-known NIAH plots, score-vs-length curves, perplexity curves.

Every method stays visible when curves coincide (a method that scores 0 everywhere, like another):
each gets its own marker, line style and a marker size shrinking with its place, hollow, so equal
points show as nested shapes; the legend sits outside the axes, never on the data."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.colors import LinearSegmentedColormap

NIAH_COLORS = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])
SIZE = (7.0, 4.0)
DPI = 100
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", "-.", ":")


def style(index: int) -> dict:
    """Line style of the ``index``-th method: marker, dash pattern, colour and a shrinking marker size."""
    return {
        "marker": MARKERS[index % len(MARKERS)],
        "linestyle": LINESTYLES[index % len(LINESTYLES)],
        "color": f"C{index % 10}",
        "markersize": max(3.0, 10.0 - 1.2 * index),
        "markerfacecolor": "none",
        "markeredgewidth": 1.5,
        "linewidth": 1.5,
    }


def _figure(size=SIZE, ncols: int = 1):
    return plt.subplots(1, ncols, figsize=size, layout="constrained")


def _legend(fig) -> None:
    """One legend for the figure, outside the axes (right of them)."""
    handles, labels = fig.axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize=8)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def _finish(fig, path: Path) -> None:
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _length_axis(ax, lengths: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlabel("length (tokens)")


def _mark_train_length(ax, train_length: int | None) -> None:
    if train_length:
        ax.axvline(train_length, color="grey", linestyle="--", linewidth=1)
        ax.text(train_length, ax.get_ylim()[1], " L_train", va="top", fontsize=8, color="grey")


def niah_heatmap(path: Path, method: str, grid: dict, task: str = "niah") -> None:
    fig, ax = _figure()
    scores = [[float("nan") if v is None else v for v in row] for row in grid["score"]]
    image = ax.imshow(scores, cmap=NIAH_COLORS, vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(grid["lengths"])), [str(n) for n in grid["lengths"]])
    ax.set_yticks(range(len(grid["depths"])), [f"{d:.0%}" for d in grid["depths"]])
    ax.set_xlabel("length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"Needle in a haystack: {method}" + (f" ({task})" if task != "niah" else ""))
    for i, row in enumerate(grid["score"]):
        for j, value in enumerate(row):
            text = "—" if value is None or value != value else f"{value:.0f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=9)
    fig.colorbar(image, ax=ax, label="score")
    _finish(fig, path)


def _number(value) -> float:
    return float("nan") if value is None else value


def score_figure(task: str, table: dict, train_length: int | None):
    fig, ax = _figure()
    every = set()
    for index, (method, row) in enumerate(table.items()):
        lengths = sorted(int(n) for n in row)
        every.update(lengths)
        ax.plot(lengths, [_number(row[str(n)]["score"]) for n in lengths], label=method, **style(index))
    _length_axis(ax, sorted(every))
    ax.set_ylim(-5, 105)
    ax.set_ylabel("score")
    ax.set_title(task)
    _mark_train_length(ax, train_length)
    _legend(fig)
    return fig


def score_curves(path: Path, task: str, table: dict, train_length: int | None) -> None:
    _finish(score_figure(task, table, train_length), path)


def perplexity_figure(table: dict, train_length: int | None):
    fig, axes = _figure((SIZE[0] * 1.6, SIZE[1]), ncols=2)
    every = set()
    for index, (method, row) in enumerate(table.items()):
        lengths = sorted(int(n) for n in row)
        every.update(lengths)
        for ax, key in zip(axes, ("ppl_whole", "ppl_sliding"), strict=True):
            ax.plot(lengths, [_number(row[str(n)][key]) for n in lengths], label=method, **style(index))
    for ax, title in zip(axes, ("whole window", "sliding window"), strict=True):
        _length_axis(ax, sorted(every))
        ax.set_yscale("log")
        ax.set_ylabel("perplexity")
        ax.set_title(f"held-out perplexity, {title}")
        _mark_train_length(ax, train_length)
    _legend(fig)
    return fig


def perplexity_curves(path: Path, table: dict, train_length: int | None) -> None:
    _finish(perplexity_figure(table, train_length), path)


def position_figure(table: dict, train_length: int | None):
    fig, ax = _figure()
    for index, (method, row) in enumerate(table.items()):
        longest = max(row, key=int)
        curve = [_number(x) for x in row[longest]["position_loss"]]
        step = int(longest) / len(curve)
        look = {**style(index), "markevery": max(1, len(curve) // 8)}
        ax.plot([step * (i + 0.5) for i in range(len(curve))], curve, label=f"{method} ({longest})", **look)
    ax.set_xlabel("position in window (tokens)")
    ax.set_ylabel("next-token loss")
    ax.set_title("loss by position at the longest length")
    _mark_train_length(ax, train_length)
    _legend(fig)
    return fig


def position_curves(path: Path, table: dict, train_length: int | None) -> None:
    _finish(position_figure(table, train_length), path)


def heatmap_name(task: str, method: str) -> str:
    return f"niah-heatmap-{slug(method)}.png" if task == "niah" else f"niah-heatmap-{slug(task)}-{slug(method)}.png"


def draw_all(folder: Path, summary: dict) -> dict[str, list[str]]:
    """Draw every picture the summary supports; returns {task label: [file names]} for the report."""
    pictures: dict[str, list[str]] = {}
    train_length = summary.get("train_length")
    for task, table in summary["tasks"].items():
        first = next(iter(next(iter(table.values())).values()))
        if "ppl_whole" in first:
            names = [f"{slug(task)}.png", f"{slug(task)}-by-position.png"]
            perplexity_curves(folder / names[0], table, train_length)
            position_curves(folder / names[1], table, train_length)
        else:
            names = [f"{slug(task)}.png"]
            score_curves(folder / names[0], task, table, train_length)
        pictures[task] = names
    for group, average in summary.get("ruler_average", {}).items():
        if average["score"]:
            name = f"{slug(group)}-average.png"
            table = {m: {n: {"score": v} for n, v in row.items()} for m, row in average["score"].items()}
            score_curves(folder / name, f"{group}: average over {len(average['subtasks'])} subtasks", table,
                         train_length)  # fmt: skip
            pictures[group] = [name]
    for task, grids in summary.get("niah_grid", {}).items():
        for method, grid in grids.items():
            name = heatmap_name(task, method)
            niah_heatmap(folder / name, method, grid, task)
            pictures.setdefault(task, []).append(name)
    return pictures
