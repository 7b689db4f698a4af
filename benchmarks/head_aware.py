"""Head-aware cache policies against SnapKV at equal bytes held, on the bundled model.

For each length, a position method that lets the bundled model (trained at 512 tokens) read that far
(``dca`` by default), and each head-aware policy (``duo`` at two sparsities, ``razor``): run passkey
and RULER ``niah_single_1`` samples, record the cache bytes each sample held after decoding
(``longlab.cache_stats``), then run ``snapkv`` with the per-head budget that holds the same mean bytes,
and print both side by side with their ratio; ``full`` is the reference. Head scores are measured once
(or read from ``--scores``) before the first sample.

    python benchmarks/head_aware.py --threads 1                 # 2048 and 4096, 8 samples per task
    python benchmarks/head_aware.py --lengths 2048 --samples 4
"""

from __future__ import annotations

import argparse
import time

import torch

import longlab
from longlab.eval.tasks.base import parse_task
from longlab.generation import encode, generate_answers

TASKS = ("passkey", "ruler:subtasks=niah_single_1")
HEAD_AWARE = ("duo:sparsity=0.5", "duo:sparsity=0.75", "razor")


def run(model, tokenizer, spec: str, samples: dict) -> tuple[dict[str, float], float]:
    """Mean score per task (%) and mean bytes held after decoding, under ``spec``."""
    longlab.apply(model, spec)
    scores, held = {}, []
    for (task, subtask), items in samples.items():
        total = 0.0
        for sample in items:
            ids = encode(tokenizer, sample.prompt)
            with torch.no_grad():
                budget, first_line = task.new_tokens(subtask), task.first_line(subtask)
                answer = generate_answers(model, tokenizer, [ids], budget, first_line)[0]
            total += task.score(subtask, answer, sample)
            held.append(longlab.cache_stats(model).bytes_held)
        scores[subtask.split("/")[-1]] = total / len(items)
    return scores, sum(held) / len(held)


def with_param(spec: str, param: str) -> str:
    """``spec`` with one more ``name=value`` parameter (none when ``param`` is empty)."""
    if not param:
        return spec
    return f"{spec},{param}" if ":" in spec else f"{spec}:{param}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--samples", type=int, default=8, help="samples per task and length")
    parser.add_argument("--position", default="dca", help="position method composed with every policy")
    parser.add_argument("--scores", default=None, help="folder of the head-score files (default: longlab's cache)")
    parser.add_argument("--policies", nargs="+", default=list(HEAD_AWARE), help="head-aware policy specs")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = longlab.load("tiny")
    config = model.config
    per_entry = 2 * config.head_dim * 4 + 4  # float32 key and value, int32 position (SnapKV's entry)
    heads = config.num_hidden_layers * config.num_key_value_heads
    extra = f"scores={args.scores}" if args.scores else ""
    print(f"bundled model, {args.position} positions, {args.samples} samples per task; accuracy % (bytes held, MiB)")
    print("| L | policy | passkey | niah_single_1 | MiB held | snapkv budget | snapkv passkey | snapkv niah_single_1 "
          "| snapkv MiB | passkey ratio | niah ratio | bytes ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for length in args.lengths:
        samples = {}
        for spec in TASKS:
            task = parse_task(spec)
            for subtask in task.subtasks():
                samples[(task, subtask)] = task.samples(subtask, tokenizer, length, args.samples, 0)
        start = time.perf_counter()
        full, full_bytes = run(model, tokenizer, f"{args.position}+full", samples)
        mib = 2**20
        print(f"| {length} | `full` | {full['passkey']:.0f} | {full['niah_single_1']:.0f} | {full_bytes / mib:.2f} "
              "| | | | | | | |", flush=True)  # fmt: skip
        for policy in args.policies:
            ours, ours_bytes = run(model, tokenizer, f"{args.position}+{with_param(policy, extra)}", samples)
            budget = round(ours_bytes / (per_entry * heads))
            snap, snap_bytes = run(model, tokenizer, f"{args.position}+snapkv:budget={budget}", samples)

            def ratio(a: float, b: float) -> str:
                return f"{a / b:.2f}" if b else ("1.00" if a == b else "inf")

            print(f"| {length} | `{policy}` | {ours['passkey']:.0f} | {ours['niah_single_1']:.0f} | "
                  f"{ours_bytes / mib:.2f} | {budget} | {snap['passkey']:.0f} | {snap['niah_single_1']:.0f} | "
                  f"{snap_bytes / mib:.2f} | {ratio(ours['passkey'], snap['passkey'])} | "
                  f"{ratio(ours['niah_single_1'], snap['niah_single_1'])} | {ratio(ours_bytes, snap_bytes)} |",
                  flush=True)  # fmt: skip
        print(f"(length {length}: {time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
