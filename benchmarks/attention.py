"""Attention kernel benchmark: longlab's segmented kernel vs PyTorch SDPA vs the naive O(L^2) form.

Prints, in one run, wall time and peak extra memory at each length for:

- ``sdpa causal``      PyTorch scaled_dot_product_attention(is_causal=True) on already-rotated q, k
- ``rope + sdpa``      what an unpatched transformers model does: rotate q and k, then SDPA
- ``longlab none``     longlab's kernel from unrotated q, k (it rotates them itself)
- ``longlab rerope``   ReRoPE, window 512 (two segments)
- ``longlab selfextend`` SelfExtend, group 4, window 512 (two segments)
- ``longlab string``   STRING at its defaults for L_train = 4096: shift 1351, window 128 (two segments)
- ``longlab dca``      Dual Chunk Attention at its defaults for L_train = 4096: chunk 2816, local window
                       256 (three chunk-lag segments)
- ``naive reference``  softmax(q k^T) v with an explicit (L x L) score matrix, one head at a time

Each (method, length) runs in a fresh process so that peak memory is its own: "extra" is the peak
resident memory during the call minus the resident memory with the inputs already allocated.

    python benchmarks/attention.py                 # L = 2k, 8k, 16k; 8 heads, head dim 64, fp32
    python benchmarks/attention.py --lengths 1024 --repeats 1
    python benchmarks/attention.py --lengths 16384 --methods "longlab string,longlab dca"
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

METHODS = ["sdpa causal", "rope + sdpa", "longlab none", "longlab rerope", "longlab selfextend", "longlab string",
           "longlab dca", "naive reference"]  # fmt: skip
SPECS = {
    "longlab none": "none",
    "longlab rerope": "rerope:window=512",
    "longlab selfextend": "selfextend:group=4,window=512",
    "longlab string": "string",
    "longlab dca": "dca",
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _measure(method: str, length: int, heads: int, head_dim: int, repeats: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    from longlab import parse
    from longlab.attention.kernel import segmented_attention
    from longlab.positions.rope import FrequencyTable, RopeConfig, base_inv_freq, rotate

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, length, head_dim) for _ in range(3))
    positions = torch.arange(length)[None]
    table = FrequencyTable(base_inv_freq(head_dim, 10000.0))
    scale = head_dim**-0.5
    if method == "sdpa causal":
        q, k = rotate(q, positions, table), rotate(k, positions, table)

        def run():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    elif method == "rope + sdpa":

        def run():
            return F.scaled_dot_product_attention(
                rotate(q, positions, table), rotate(k, positions, table), v, is_causal=True
            )
    elif method == "naive reference":
        q, k = rotate(q, positions, table), rotate(k, positions, table)
        causal = torch.ones(length, length, dtype=torch.bool).tril()

        def run():
            out = torch.empty_like(q)
            for h in range(heads):
                scores = (q[0, h] @ k[0, h].T * scale).masked_fill(~causal, -math.inf)
                out[0, h] = torch.softmax(scores, dim=-1) @ v[0, h]
            return out
    else:
        rope = RopeConfig(head_dim, 10000.0, 4096, table.inv_freq)
        position_method = parse(SPECS[method])[0].resolve(rope)
        segments = position_method.segments()

        def run():
            return segmented_attention(q, k, v, positions, positions, segments, table, scale)

    baseline = _rss_bytes()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
        del out
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"method": method, "length": length, "seconds": statistics.median(times), "extra_bytes": peak - baseline}


def _format_row(length: int, rows: dict, methods: list[str]) -> str:
    sdpa = rows["sdpa causal"]
    cells = []
    for method in methods:
        r = rows.get(method)
        if r is None:
            cells.append("—")
            continue
        time_ratio = r["seconds"] / sdpa["seconds"]
        mem_ratio = r["extra_bytes"] / max(sdpa["extra_bytes"], 1)
        cells.append(f"{r['seconds']:.3f} s ({time_ratio:.2f}×), {r['extra_bytes'] / 2**20:.0f} MiB ({mem_ratio:.2f}×)")
    return f"| {length} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="2048,8192,16384")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", help="comma-separated subset of the columns (sdpa causal is always measured)")
    parser.add_argument("--json", help="also write the measurements to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, length = args.child.rsplit("@", 1)
        print(json.dumps(_measure(method, int(length), args.heads, args.head_dim, args.repeats, args.threads)))
        return

    lengths = [int(x) for x in args.lengths.split(",")]
    methods = METHODS
    if args.methods:
        asked = {m.strip() for m in args.methods.split(",")}
        unknown = asked - set(METHODS)
        if unknown:
            parser.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
        methods = [m for m in METHODS if m in asked or m == "sdpa causal"]
    print(
        f"attention, batch 1, {args.heads} heads, head dim {args.head_dim}, fp32, {args.threads} threads, "
        f"median of {args.repeats}; time (ratio to sdpa causal), peak extra memory (ratio to sdpa causal)\n"
    )
    print("| L | " + " | ".join(methods) + " |")
    print("|---" * (len(methods) + 1) + "|")
    results = []
    for length in lengths:
        rows = {}
        for method in methods:
            options = {"--heads": args.heads, "--head-dim": args.head_dim, "--repeats": args.repeats,
                       "--threads": args.threads}  # fmt: skip
            command = [sys.executable, __file__, "--child", f"{method}@{length}"]
            command += [str(x) for item in options.items() for x in item]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            rows[method] = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(rows[method])
        print(_format_row(length, rows, methods), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
