"""report.md and the extrapolation plot of a lab run, built from results.jsonl alone."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from longlab.eval.plots import style

# What the papers report, beside ours (the shape to reproduce, not the same setting or scale).
PAPERS = """\
## What the papers report

The papers' models and data are far larger than the lab's; compare the *shape* of the curves (flat
versus rising past the training length), not the values.

- **Press et al., 2022** (ALiBi, ICLR 2022, abstract and Figure 1): trained on WikiText-103 at L = 512
  and L = 1024, sinusoidal, rotary and T5-bias perplexity degrades as inputs grow past L while ALiBi's
  does not; a 1.3B-parameter ALiBi model trained at 1024 and evaluated at 2048 matches the perplexity
  of a sinusoidal model trained at 2048, training 11% faster with 11% less memory. (Exact per-length
  perplexities: the paper's appendix Tables 2-3; not transcribed here.)
- **Sun et al., 2023** (xPos, ACL 2023, Table 1): length extrapolation fails for sinusoidal, learnable
  (worst), RoPE and T5 and holds for ALiBi and xPos.
- **Chi et al., 2022** (KERPLE, NeurIPS 2022) and **Chi et al., 2023** (Sandwich, ACL 2023): KERPLE
  (log and power) and the parameter-free Sandwich extrapolate like ALiBi, with perplexity that keeps
  falling as inputs grow past L.
- **Li et al., 2024** (FIRE, ICLR 2024): FIRE generalises to long inputs better than RoPE, ALiBi,
  KERPLE and T5 bias on language modelling and long-context tasks.
- **Kazemnejad et al., 2023** (NoPE, NeurIPS 2023): a decoder without position encoding generalises
  to longer inputs better than absolute encodings (and than T5, ALiBi and RoPE on their tasks).
- **Ruoss et al., 2023** (randomized positions, ACL 2023): randomizing training positions raises
  length-generalisation accuracy over the same encoding at plain positions.
- **Dai et al., 2019** (Transformer-XL, ACL 2019, abstract and §4): segment-level recurrence lets a
  model use context beyond its segment: dependencies about 450% longer than a vanilla (fixed-segment)
  Transformer's, and lower perplexity than it at equal segment length.
"""


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
        "| component | parameters | tokens/s | peak memory (MB) | final train loss |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        t = train.get(name)
        if t:
            peak = f"{t['peak_memory_mb']:.0f}" if t.get("peak_memory_mb") else "–"
            lines.append(
                f"| `{name}` | {t['parameters']:,} | {t['tokens_per_s']:.0f} | {peak} | {t['final_loss']:.3f} |"
            )
    lines += [
        "",
        "Peak memory is the CUDA allocator's peak on a GPU, the process's peak resident size on the CPU "
        "(Python and torch included).",
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
