"""report.md and the extrapolation plot of a lab run, built from results.jsonl alone."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from longlab.eval.plots import style

# What the papers report, beside ours (the shape to reproduce, not the same setting or scale): (paper,
# setting, finding, per-length numbers). A per-length cell holds only numbers transcribed from a table
# named there; "not transcribed" never stands for an estimate.
PAPER_ROWS = [
    (
        "Press et al., 2022 (ALiBi), Figure 1",
        "WikiText-103, trained at L = 512 and 1024",
        "sinusoidal, rotary and T5-bias perplexity rises past L, ALiBi's does not; 1.3B ALiBi trained at "
        "1024 and evaluated at 2048 matches sinusoidal trained at 2048 (11% faster, 11% less memory)",
        "appendix Tables 2-3 (sinusoidal, rotary, T5, ALiBi by evaluation length): not transcribed",
    ),
    (
        "Sun et al., 2023 (xPos), Table 1",
        "—",
        "extrapolation fails for sinusoidal, learned (worst), RoPE and T5; holds for ALiBi and xPos",
        "not transcribed",
    ),
    (
        "Chi et al., 2022 (KERPLE)",
        "OpenWebText2, GitHub, ArXiv, trained at 512",
        "log and power variants extrapolate like ALiBi, perplexity keeps falling past L",
        "Table 3 (by test length): not transcribed",
    ),
    (
        "Chi et al., 2023 (Sandwich)",
        "as KERPLE",
        "the parameter-free Sandwich extrapolates like KERPLE and ALiBi",
        "not transcribed",
    ),
    (
        "Li et al., 2024 (FIRE)",
        "language modelling, long-context tasks",
        "FIRE generalises to long inputs better than RoPE, ALiBi, KERPLE and T5 bias",
        "not transcribed",
    ),
    (
        "Kazemnejad et al., 2023 (NoPE)",
        "synthetic and reasoning tasks",
        "no position encoding generalises better than absolute encodings (and T5, ALiBi, RoPE there)",
        "not transcribed",
    ),
    (
        "Ruoss et al., 2023 (randomized)",
        "algorithmic tasks",
        "random training positions raise length-generalisation accuracy over plain positions",
        "not transcribed",
    ),
    (
        "Golovneva et al., 2024 (CoPE)",
        "counting, selective copy, Flip-Flop; Wikitext-103 and code language modelling",
        "CoPE solves counting and copy tasks where token positions fail, generalises to longer contexts "
        "than relative PE and lowers perplexity",
        "not transcribed",
    ),
    (
        "Dai et al., 2019 (Transformer-XL), abstract and §4",
        "WikiText-103, enwik8, text8, One Billion Word, Penn Treebank",
        "segment-level recurrence lets a model use context beyond its segment: dependencies about 450% "
        "longer than a vanilla fixed-segment Transformer's, and lower perplexity at equal segment length",
        "not transcribed",
    ),
]

PAPERS = "\n".join(
    [
        "## What the papers report",
        "",
        "The papers' models and data are far larger than the lab's; compare the *shape* of the curves (flat",
        "versus rising past the training length), not the values. Per-length numbers appear only where they",
        "were transcribed from a table named in the cell.",
        "",
        "| paper | setting | finding | per-length numbers |",
        "|---|---|---|---|",
        *(f"| {' | '.join(row)} |" for row in PAPER_ROWS),
        "",
    ]
)


def _table(rows: list[dict], kind: str, key: str, lengths: list[int], names: list[str], fmt) -> list[str]:
    values = {(r["component"], r["length"]): r[key] for r in rows if r["kind"] == kind}
    head = "| component | " + " | ".join(f"{n} ({n // lengths[0]}x)" for n in lengths) + " |"
    lines = [head, "|---" * (len(lengths) + 1) + "|"]
    for name in names:
        cells = [fmt(values[name, n]) if (name, n) in values else "–" for n in lengths]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return lines


def _ppl(x: float) -> str:
    return f"{x:.1f}" if math.isfinite(x) and x < 1e5 else f"{x:.2e}"


def write_report(out: Path, config, rows: list[dict]) -> Path:
    names = list(dict.fromkeys(r["component"] for r in rows))
    lengths = sorted({r["length"] for r in rows if r["kind"] == "ppl"})
    train = {r["component"]: r for r in rows if r["kind"] == "train"}
    lines = [
        f"# longlab lab: preset `{config.preset}`",
        "",
        f"Size `{config.size}`, vocabulary {config.vocab_size or 8192} tokens, trained at L = {config.length} "
        f"tokens for {config.steps} steps of "
        f"{config.batch_size} rows ({config.steps * config.batch_size * config.length} tokens), seed "
        f"{config.seed}: the same data, tokens and initial weights for every component. Evaluation: "
        f"held-out perplexity over {config.ppl_windows} windows per length, passkey accuracy over "
        f"{config.passkey_samples} samples per length.",
        "",
        "## Perplexity by length (held-out test split)",
        "",
        *_table(rows, "ppl", "ppl", lengths, names, _ppl),
        "",
        "![perplexity by length](perplexity.png)",
        "",
        "## Passkey accuracy by length",
        "",
        *_table(rows, "passkey", "accuracy", lengths, names, lambda x: f"{100 * x:.0f}%"),
        "",
        "## Training cost",
        "",
        "| component | parameters | tokens/s | peak memory (MB) | final train loss | KV cache bytes/token |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        t = train.get(name)
        if t:
            peak = f"{t['peak_memory_mb']:.0f}" if t.get("peak_memory_mb") else "–"
            kv = f"{t['kv_bytes_per_token']:,}" if t.get("kv_bytes_per_token") is not None else "–"
            lines.append(
                f"| `{name}` | {t['parameters']:,} | {t['tokens_per_s']:.0f} | {peak} | {t['final_loss']:.3f} | {kv} |"
            )
    lines += [
        "",
        "Peak memory is the CUDA allocator's peak on a GPU, the process's peak resident size on the CPU "
        "(Python and torch included). KV cache bytes/token: keys and values a decoder keeps per token, all "
        "layers, at the weights' precision (– : no per-token cache, e.g. linear attention's constant state); "
        "a component with a bounded span (sliding window, segments, Transformer-XL's memory) keeps at most "
        "its span of tokens, at the same bytes per token.",
        "",
        PAPERS,
    ]
    _plot(out / "perplexity.png", rows, names, lengths, config.length)
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _plot(path: Path, rows: list[dict], names: list[str], lengths: list[int], train_length: int) -> None:
    fig, ax = plt.subplots(figsize=(8.0, 4.5), layout="constrained")
    for index, name in enumerate(names):
        points = sorted((r["length"], r["ppl"]) for r in rows if r["kind"] == "ppl" and r["component"] == name)
        if points:
            ax.plot(*zip(*points, strict=True), label=name, **style(index))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    if lengths:
        ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.minorticks_off()
    ax.axvline(train_length, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("extrapolation: perplexity by length (dashed: training length)")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
