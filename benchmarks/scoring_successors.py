"""Expected Attention and KVzip against SnapKV at equal budgets on the bundled model, past its training length.

For each length, task and compression ratio, every policy reads the same prompts (the eval tasks'
own samples and scoring: passkey, RULER needles) under one position method that reaches the length,
and greedily answers from its compressed cache. ``kvzip`` prefills, is scored by context
reconstruction (longlab.cache.reconstruction.compress_with_reconstruction) and then decodes; the
others compress inside their forward calls. One prompt at a time (KVzip scores batch 1). Every
policy keeps the same number of cache entries in total (KVzip's global allocation spreads them
unevenly over layers and heads). Rows are appended to ``--out`` as they finish, so an interrupted
run resumes; the table (accuracy %, and each policy's ratio to SnapKV's) is printed from that file.

    python benchmarks/scoring_successors.py --threads 1                       # 2048, r = 0.75, SelfExtend
    python benchmarks/scoring_successors.py --lengths 4096 --position dca --tasks passkey   # SelfExtend's
                                                                              # reach (~3200) is below 4096
    python benchmarks/scoring_successors.py --lengths 2048 --ratios 0.5 0.75 --samples 10
    python benchmarks/scoring_successors.py --policies snapkv expected_attention:window=64
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

POLICIES = ("full", "snapkv", "expected_attention", "kvzip")
TASKS = {"passkey": ("passkey", "passkey"), "niah_single_1": ("ruler:subtasks=niah_single_1", "ruler/niah_single_1")}


def _answer(model, tokenizer, ids, policy: str, new_tokens: int) -> tuple[str, float, int]:
    """Greedy answer of a longlab-applied model; (text, prefill + compression seconds, entries kept)."""
    import torch
    from transformers import DynamicCache

    import longlab
    from longlab.cache.reconstruction import compress_with_reconstruction

    cache = DynamicCache()
    with torch.no_grad():
        start = time.perf_counter()
        out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        if policy == "kvzip":
            compress_with_reconstruction(model, tokenizer, ids, cache)
        seconds = time.perf_counter() - start
        kept = sum(t for layer in longlab.cache_stats(cache).layers for row in layer.tokens for t in row)
        tokens = []
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            tokens.append(int(token))
            if tokens[-1] == tokenizer.eos_token_id:
                break
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
    return tokenizer.decode(tokens, skip_special_tokens=True), seconds, kept


def run(args: argparse.Namespace) -> None:
    import torch

    import longlab
    from longlab.eval.tasks import parse_task
    from longlab.generation import encode

    torch.set_num_threads(args.threads)
    model, tokenizer = longlab.load("tiny")
    out = Path(args.out)
    done = set()
    if out.exists():
        rows = map(json.loads, out.read_text().splitlines())
        done = {(r["policy"], r["task"], r["length"], r["ratio"], r["sample"]) for r in rows}
    for length in args.lengths:
        for task_name in args.tasks:
            spec, subtask = TASKS[task_name]
            task = parse_task(spec)
            samples = task.samples(subtask, tokenizer, length, args.samples, seed=0)
            for ratio in args.ratios:
                for policy in args.policies:
                    if policy == "full" and ratio != args.ratios[0]:
                        continue  # the uncompressed reference is the same at every ratio
                    joiner = "," if ":" in policy else ":"
                    method = f"{args.position}+" + (policy if policy == "full" else f"{policy}{joiner}ratio={ratio}")
                    longlab.apply(model, method)
                    for i, sample in enumerate(samples):
                        if (policy, task_name, length, ratio, i) in done:
                            continue
                        ids = encode(tokenizer, sample.prompt)
                        kind = policy.split(":")[0]
                        text, seconds, kept = _answer(model, tokenizer, ids, kind, task.new_tokens(subtask))
                        row = {"policy": policy, "task": task_name, "length": length, "ratio": ratio, "sample": i,
                               "method": method, "prompt_tokens": ids.shape[1], "kept": kept, "seconds": seconds,
                               "expected": sample.answers, "predicted": text,
                               "score": task.score(subtask, text, sample)}  # fmt: skip
                        with out.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                        print(json.dumps({k: row[k] for k in ("policy", "task", "length", "ratio", "sample", "score",
                                                              "seconds")}), flush=True)  # fmt: skip


def table(path: str) -> str:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["length"], r["task"], r["ratio"], r["policy"]), []).append(r)
    lines = ["| length | task | ratio | policy | samples | accuracy % | vs snapkv | entries kept (all layers) "
             "| prefill + scoring s |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    run_order = list(dict.fromkeys(r["policy"] for r in rows))
    order = sorted(cells.items(), key=lambda kv: (kv[0][:3], run_order.index(kv[0][3])))
    for (length, task, ratio, policy), group in order:
        accuracy = sum(r["score"] for r in group) / len(group)
        snap = cells.get((length, task, ratio, "snapkv"))
        versus = "—"
        if snap and policy != "snapkv":
            base = sum(r["score"] for r in snap) / len(snap)
            versus = f"{accuracy / base:.2f}×" if base else "—"
        kept = sum(r["kept"] for r in group) / len(group)
        seconds = sum(r["seconds"] for r in group) / len(group)
        shown_ratio = "—" if policy == "full" else ratio
        lines.append(f"| {length} | {task} | {shown_ratio} | {policy} | {len(group)} | {accuracy:.0f} | {versus} "
                     f"| {kept:.0f} | {seconds:.1f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.75])
    parser.add_argument("--policies", nargs="+", default=list(POLICIES),
                        help="cache policies, optionally with parameters (expected_attention:window=64); "
                        "the ratio is added")  # fmt: skip
    parser.add_argument("--position", default="selfextend:group=8,window=128")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/scoring_successors.jsonl")
    parser.add_argument("--table-only", action="store_true", help="print the table of --out without running")
    args = parser.parse_args()
    if not args.table_only:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        run(args)
    print(table(args.out))


if __name__ == "__main__":
    main()
