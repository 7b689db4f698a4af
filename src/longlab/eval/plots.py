"""The report's pictures (matplotlib, headless): NIAH heatmaps in the red -> yellow -> green
convention of the well-known NIAH plots, score-vs-length curves, perplexity curves."""

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


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def _finish(fig, path: Path) -> None:
    fig.tight_layout()
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


def niah_heatmap(path: Path, method: str, grid: dict) -> None:
    fig, ax = plt.subplots(figsize=SIZE)
    image = ax.imshow(grid["score"], cmap=NIAH_COLORS, vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(grid["lengths"])), [str(n) for n in grid["lengths"]])
    ax.set_yticks(range(len(grid["depths"])), [f"{d:.0%}" for d in grid["depths"]])
    ax.set_xlabel("length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"Needle in a haystack: {method}")
    for i, row in enumerate(grid["score"]):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=9)
    fig.colorbar(image, ax=ax, label="score")
    _finish(fig, path)


def score_curves(path: Path, task: str, table: dict, train_length: int | None) -> None:
    fig, ax = plt.subplots(figsize=SIZE)
    every = set()
    for method, row in table.items():
        lengths = sorted(int(n) for n in row)
        every.update(lengths)
        ax.plot(lengths, [row[str(n)]["score"] for n in lengths], marker="o", label=method)
    _length_axis(ax, sorted(every))
    ax.set_ylim(-5, 105)
    ax.set_ylabel("score")
    ax.set_title(task)
    _mark_train_length(ax, train_length)
    ax.legend(fontsize=8)
    _finish(fig, path)


def perplexity_curves(path: Path, table: dict, train_length: int | None) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(SIZE[0] * 1.6, SIZE[1]))
    every = set()
    for method, row in table.items():
        lengths = sorted(int(n) for n in row)
        every.update(lengths)
        for ax, key in zip(axes, ("ppl_whole", "ppl_sliding"), strict=True):
            ax.plot(lengths, [row[str(n)][key] for n in lengths], marker="o", label=method)
    for ax, title in zip(axes, ("whole window", "sliding window"), strict=True):
        _length_axis(ax, sorted(every))
        ax.set_yscale("log")
        ax.set_ylabel("perplexity")
        ax.set_title(f"held-out perplexity, {title}")
        _mark_train_length(ax, train_length)
    axes[0].legend(fontsize=8)
    _finish(fig, path)


def position_curves(path: Path, table: dict, train_length: int | None) -> None:
    fig, ax = plt.subplots(figsize=SIZE)
    for method, row in table.items():
        longest = max(row, key=int)
        curve = row[longest]["position_loss"]
        step = int(longest) / len(curve)
        ax.plot([step * (i + 0.5) for i in range(len(curve))], curve, label=f"{method} ({longest})")
    ax.set_xlabel("position in window (tokens)")
    ax.set_ylabel("next-token loss")
    ax.set_title("loss by position at the longest length")
    _mark_train_length(ax, train_length)
    ax.legend(fontsize=8)
    _finish(fig, path)


def draw_all(folder: Path, summary: dict) -> dict[str, list[str]]:
    """Draw every picture the summary supports; returns {task: [file names]} for the report."""
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
    for method, grid in summary.get("niah_grid", {}).items():
        name = f"niah-heatmap-{slug(method)}.png"
        niah_heatmap(folder / name, method, grid)
        pictures.setdefault("niah", []).append(name)
    return pictures
