"""Sparse prefill benchmark: dense attention vs ``minference`` vs ``xattention``, time and accuracy.

Part ``attention`` (one attention layer of a 7B Llama: 32 query heads, 8 KV heads, head dim 128,
batch 1, float32 on the CPU) prints per length: dense causal SDPA on rotated q, k (what the model's
dense path calls: one flash op), each sparse method (estimation included), their time ratio to dense,
the fraction of causal (query, key) pairs each computes, and the relative error of its output.
Inputs are synthetic with the structure sparse prefill relies on (a local band and a few sink keys,
as real attention heads have: keys a slowly varying AR(1) sequence, queries aligned with their own
key, a shared direction on the first 4 keys); ``--random`` uses i.i.d. Gaussian q, k instead (diffuse
attention: the worst case for every sparse method).

Part ``passkey`` runs the bundled model on passkey retrieval at 2048 / 4096 tokens with a position
method (``dca`` by default) with and without each sparse prefill, through
``longlab eval``'s runner, and prints accuracy and prefill+generation time side by side.

    python benchmarks/sparse_prefill.py attention --lengths 4096,8192,16384
    python benchmarks/sparse_prefill.py passkey --lengths 2048,4096 --samples 8
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from longlab import parse
from longlab.positions.rope import FrequencyTable, base_inv_freq, rotate
from longlab.positions.segments import Segment

SPARSE = {
    "minference": "minference:vertical=1000,slash=256",
    "xattention": "xattention:threshold=0.9",
}


def structured_inputs(length: int, heads: int = 32, kv_heads: int = 8, dim: int = 128, random: bool = False):
    """q (1, H, L, d), k and v (1, Hk, L, d) float32."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1, kv_heads, length, dim, generator=g)
    if random:
        return torch.randn(1, heads, length, dim, generator=g), torch.randn(1, kv_heads, length, dim, generator=g), v
    noise = torch.randn(1, kv_heads, length, dim, generator=g)
    k = torch.empty_like(noise)
    k[:, :, 0] = noise[:, :, 0]
    rho = 0.98  # correlation length ~50 tokens: attention is local
    for start in range(1, length, 1024):  # AR(1) written blockwise: k_t = rho k_{t-1} + sqrt(1 - rho^2) e_t
        stop = min(start + 1024, length)
        steps = torch.arange(1, stop - start + 1, dtype=torch.float32)
        powers = rho ** (steps[:, None] - steps[None, :]).clamp(min=0) * (steps[:, None] >= steps[None, :])
        k[:, :, start:stop] = (
            powers @ (noise[:, :, start:stop] * math.sqrt(1 - rho**2))
            + (rho**steps)[:, None] * k[:, :, start - 1 : start]
        )
    sink = torch.randn(dim, generator=g)
    k[:, :, :4] += 3 * sink
    q = 1.5 * k.repeat_interleave(heads // kv_heads, 1) + 0.5 * torch.randn(1, heads, length, dim, generator=g)
    q += 0.7 * sink
    return q, k, v


def attention_part(args) -> None:
    table = FrequencyTable(base_inv_freq(128, 500000.0))
    scale = 128**-0.5
    segments = (Segment(),)
    print(f"one layer: 32 heads, 8 KV heads, d=128, batch 1, float32, {torch.get_num_threads()} threads, "
          f"{'random' if args.random else 'structured'} inputs")  # fmt: skip
    print(f"{'L':>6} {'dense s':>8} | " + " | ".join(f"{name:>10} s  ratio  pairs  rel.err" for name in SPARSE))
    for length in args.lengths:
        q, k, v = structured_inputs(length, random=args.random)
        positions = torch.arange(length)[None]
        with torch.no_grad():
            start = time.perf_counter()
            q_rot, k_rot = rotate(q, positions, table), rotate(k, positions, table)
            dense = F.scaled_dot_product_attention(q_rot, k_rot, v, is_causal=True, scale=scale, enable_gqa=True)
            dense_s = time.perf_counter() - start
            del q_rot, k_rot
            cells = []
            for spec in SPARSE.values():
                (method,) = parse(spec.replace(":", ":min_length=2,", 1))
                start = time.perf_counter()
                out = method.attend(q, k, v, positions, positions, segments, table, scale)
                seconds = time.perf_counter() - start
                selection = method.select(q, k, positions, positions, None, segments, table, scale)
                pairs = _pairs(selection, length) / (length * (length + 1) / 2 * q.shape[1])
                error = ((out - dense).norm() / dense.norm()).item()
                cells.append(f"{seconds:12.2f} {dense_s / seconds:5.2f}x {pairs:6.1%} {error:8.1e}")
        print(f"{length:>6} {dense_s:8.2f} | " + " | ".join(cells), flush=True)
    print("ratio = dense time / sparse time (> 1: sparse is faster); pairs = causal pairs computed / all causal pairs")


def _pairs(selection, length: int) -> float:
    """Causal (query, key) pairs the selection computes, summed over heads."""
    grid, total = selection.grid, 0.0
    for i in range(grid.n_blocks):
        a, z = grid.block(i)
        past = selection.keys(i, a).sum().item()
        total += past * (z - a) + (z - a) * (z - a + 1) / 2 * selection_heads(selection)
    return total


def selection_heads(selection) -> int:
    return (selection.verticals if hasattr(selection, "verticals") else selection.tiles).shape[1]


def passkey_part(args) -> None:
    from longlab.eval.runner import EvalConfig, run

    specs = [args.position] + [f"{args.position}+{spec}" for spec in args.sparse]
    rows = {}
    with tempfile.TemporaryDirectory() as out:
        for spec in specs:
            folder = Path(out) / str(len(rows))
            config = EvalConfig(model="tiny", methods=[spec], tasks=["passkey"], lengths=args.lengths,
                                samples=args.samples, out=str(folder), device="cpu",
                                allow_beyond_reach=True)  # fmt: skip
            start = time.perf_counter()
            run(config)
            seconds = time.perf_counter() - start
            results = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
            rows[spec] = (results, seconds)
    print(f"passkey on the bundled model, {args.samples} samples per length: accuracy (%), mean latency per sample")
    print(f"{'method':<64} " + " ".join(f"{length:>16}" for length in args.lengths) + "   total s")
    base = {}
    for spec, (results, seconds) in rows.items():
        cells = []
        for length in args.lengths:
            mine = [r for r in results if r.get("length") == length]
            accuracy = sum(r["score"] for r in mine) / max(len(mine), 1)  # scores are 0 or 100
            latency = sum(r["latency_s"] for r in mine) / max(len(mine), 1)
            base.setdefault(length, latency)
            cells.append(f"{accuracy:5.1f} {latency:5.1f}s {base[length] / latency:4.2f}x")
        print(f"{spec:<64} " + " ".join(cells) + f"   {seconds:7.1f}")
    print("x = dense latency / this latency (prefill + greedy answer; the sparse part is the prefill only)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["attention", "passkey"])
    parser.add_argument("--lengths", default=None, help="comma-separated token counts")
    parser.add_argument("--random", action="store_true", help="i.i.d. Gaussian q, k (diffuse attention)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--position", default="dca")
    parser.add_argument(
        "--sparse", nargs="*",
        default=["minference:min_length=512,vertical=64,slash=256", "xattention:min_length=512,threshold=0.9,block=64"],
    )  # fmt: skip
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    default = "4096,8192,16384" if args.part == "attention" else "2048,4096"
    args.lengths = [int(x) for x in (args.lengths or default).split(",")]
    attention_part(args) if args.part == "attention" else passkey_part(args)


if __name__ == "__main__":
    main()
