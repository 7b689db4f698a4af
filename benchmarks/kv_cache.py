"""KV-cache benchmark on the bundled model: memory held, peak memory, prefill time, decode speed.

For each context length and cache policy, in a fresh process (so peak memory is its own), prefill a
prompt of random tokens, then decode ``--steps`` tokens one at a time, and report:

- cache bytes held after prefill (``longlab.cache_stats``), and the bound budget / length x full;
- peak extra resident memory during prefill (VmHWM reset after loading the model and the prompt);
- prefill time and decode tokens per second, each as a ratio to ``full``.

The position method is ``none`` for every row: this measures cost, not quality (see docs/cache.md
for accuracy). ``chunk=C`` rows prefill C tokens at a time, compressing after each chunk.

    python benchmarks/kv_cache.py                        # 4k and 16k, budgets 512 and 1024
    python benchmarks/kv_cache.py --lengths 2048 --steps 8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def policies(budgets: list[int]) -> list[str]:
    rows = ["full"]
    for budget in budgets:
        rows += [f"snapkv:budget={budget}", f"snapkv:budget={budget},chunk={budget}"]
    rows += [f"streaming:sinks=4,window={budgets[-1] - 4}", "kv_int8", "kv_int4"]
    return rows


def _measure(spec: str, length: int, steps: int, threads: int) -> dict:
    import torch

    import longlab
    from longlab.eval import memory

    torch.set_num_threads(threads)
    model, _ = longlab.load("tiny")
    longlab.apply(model, spec)
    ids = torch.randint(10, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    memory.reset_peak()
    baseline = memory.resident_bytes()
    with torch.no_grad():
        start = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - start
        peak = memory.peak_bytes() - baseline
        stats = longlab.cache_stats(model)
        cache = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        decode = time.perf_counter() - start
    after = longlab.cache_stats(model)
    kept = max(t for layer in after.layers for row in layer.tokens for t in row)
    return {
        "spec": spec,
        "length": length,
        "bytes_held": stats.bytes_held,
        "bytes_full": stats.bytes_full,
        "peak_extra": peak,
        "prefill_s": prefill,
        "decode_tokens_per_s": steps / decode,
        "kept_after_decode": kept,
    }


def _budget(spec: str) -> int | None:
    for part in spec.split(":")[-1].split(","):
        if part.startswith("budget="):
            return int(part.split("=")[1])
    if spec.startswith("streaming"):
        return 4 + int(spec.split("window=")[1])
    return None


def _row(r: dict, full: dict) -> str:
    budget = _budget(r["spec"])
    bound = f"{budget / r['length'] * r['bytes_full'] / 2**20:.2f}" if budget else "—"
    mib = 2**20
    return (
        f"| {r['length']} | `{r['spec']}` | {r['bytes_held'] / mib:.2f} ({r['bytes_held'] / full['bytes_held']:.3f}×) "
        f"| {bound} | {r['peak_extra'] / mib:.0f} ({r['peak_extra'] / full['peak_extra']:.2f}×) "
        f"| {r['prefill_s']:.2f} ({r['prefill_s'] / full['prefill_s']:.2f}×) "
        f"| {r['decode_tokens_per_s']:.1f} ({r['decode_tokens_per_s'] / full['decode_tokens_per_s']:.2f}×) "
        f"| {r['kept_after_decode']} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="4096,16384")
    parser.add_argument("--budgets", default="512,1024")
    parser.add_argument("--steps", type=int, default=32, help="decoding steps timed after prefill")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the measurements to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec, length = args.child.rsplit("@", 1)
        print(json.dumps(_measure(spec, int(length), args.steps, args.threads)))
        return

    budgets = [int(x) for x in args.budgets.split(",")]
    print(
        f"bundled tiny model (6 layers, 4 KV heads, head dim 32, fp32), batch 1, {args.threads} threads, "
        f"{args.steps} decode steps; ratios are to `full` at the same length\n"
    )
    print(
        "| L | policy | cache MiB held | budget/L × full MiB | peak extra MiB in prefill "
        "| prefill s | decode tokens/s | max kept per head after decode |"
    )
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for length in [int(x) for x in args.lengths.split(",")]:
        full = None
        for spec in policies(budgets):
            command = [sys.executable, __file__, "--child", f"{spec}@{length}", "--steps", str(args.steps)]
            command += ["--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            full = full or r
            results.append(r)
            print(_row(r, full), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
