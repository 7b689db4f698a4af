"""Fine-tuned checkpoints side by side: perplexity by length and passkey accuracy, each run's perplexity
as a ratio to the un-tuned baseline's (docs/training.md has the commands that made the folders).

    python benchmarks/finetune.py runs/fteval base pi-full-10 pi-full-20 yarn-full-10 pi-pose-20 pi-pose-80

reads ``FOLDER/NAME-ppl[-*]`` and ``FOLDER/NAME-passkey[-*]`` (``longlab eval`` output folders) from
their ``results.jsonl`` alone, so a run still being evaluated shows what it has (n = samples so far);
the first name is the baseline.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path


def _rows(folder: Path) -> list[dict]:
    """Every result line of ``folder`` and of its siblings ``folder-*`` (one run's lengths evaluated apart)."""
    paths = [p / "results.jsonl" for p in (folder, *sorted(folder.parent.glob(folder.name + "-*")))]
    return [json.loads(line) for path in paths if path.exists() for line in path.read_text().splitlines()]


def perplexity(folder: Path) -> dict[int, tuple[float, int]]:
    """Sliding-window perplexity by length: exp of the token-weighted mean loss, and the sample count."""
    losses = defaultdict(list)
    for row in _rows(folder):
        losses[row["length"]].append((row["loss_sliding"], row["sliding_tokens"]))
    return {
        length: (math.exp(sum(loss * n for loss, n in pairs) / sum(n for _, n in pairs)), len(pairs))
        for length, pairs in sorted(losses.items())
    }


def passkey(folder: Path) -> dict[int, tuple[float, int]]:
    scores = defaultdict(list)
    for row in _rows(folder):
        scores[row["length"]].append(row["score"])
    return {length: (sum(s) / len(s), len(s)) for length, s in sorted(scores.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("names", nargs="+")
    args = parser.parse_args()
    base = perplexity(args.folder / f"{args.names[0]}-ppl")
    print("| run | ppl 512 | ppl 1024 | ppl 2048 | passkey 1024 | passkey 2048 |")
    print("|---|---|---|---|---|---|")
    for name in args.names:
        ppl, keys = perplexity(args.folder / f"{name}-ppl"), passkey(args.folder / f"{name}-passkey")
        cells = []
        for length in (512, 1024, 2048):
            if length not in ppl:
                cells.append("—")
                continue
            value, n = ppl[length]
            ratio = f" ({value / base[length][0]:.2f}×)" if length in base and name != args.names[0] else ""
            cells.append(f"{value:.1f}{ratio} n={n}")
        for length in (1024, 2048):
            cells.append(f"{keys[length][0]:.0f}% n={keys[length][1]}" if length in keys else "—")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
