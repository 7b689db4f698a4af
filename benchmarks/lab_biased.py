"""The lab's blockwise biased attention vs the naive form that materialises the (L x L) bias.

Prints, in one run, forward + backward wall time and the bias memory each holds at once, side by
side with their ratio, for an ALiBi bias and a FIRE bias (learnable MLP) at each length:

- ``blockwise``  :func:`longlab.attention.biased.biased_attention`, 128 x 128 blocks, hand-written backward
- ``naive``      softmax(q k^T / sqrt(d) + bias) v with the full (H, L, L) bias and autograd

    python benchmarks/lab_biased.py                       # L = 512, 1024, 2048; 4 heads, head dim 16
    python benchmarks/lab_biased.py --lengths 4096 --heads 8 --dim 64
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from longlab.attention.biased import DEFAULT_BLOCK, biased_attention
from longlab.lab.components import component
from longlab.lab.positions.base import ModelShape


def naive(q, k, v, bias):
    t = q.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    return torch.softmax(scores.masked_fill(future, -math.inf), dim=-1) @ v


def timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,1024,2048")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'bias':<6} {'L':>6} {'blockwise s':>12} {'naive s':>9} {'time ratio':>10} "
          f"{'bias MB blockwise':>18} {'bias MB naive':>14} {'memory ratio':>12}")  # fmt: skip
    for spec in ("alibi", "fire"):
        module = component(spec).build(ModelShape(args.heads * args.dim, args.heads, args.dim, 128))
        params = module.bias_params()
        for length in (int(x) for x in args.lengths.split(",")):
            positions = torch.arange(length)
            q, k, v = (torch.randn(1, args.heads, length, args.dim, requires_grad=True) for _ in range(3))

            def ours(q=q, k=k, v=v, positions=positions, module=module, params=params):
                biased_attention(q, k, v, positions, module.bias, params).sum().backward()

            def reference(q=q, k=k, v=v, positions=positions, module=module, params=params):
                naive(q, k, v, module.bias(params, positions, positions)).sum().backward()

            ours()  # warm-up
            t_ours, t_naive = timed(ours), timed(reference)
            # the bias each form holds at once, float32: one block per head vs the whole matrix per head
            block_mb = args.heads * min(DEFAULT_BLOCK, length) ** 2 * 4 / 2**20
            full_mb = args.heads * length * length * 4 / 2**20
            print(f"{spec:<6} {length:>6} {t_ours:>12.3f} {t_naive:>9.3f} {t_ours / t_naive:>10.2f} "
                  f"{block_mb:>18.2f} {full_mb:>14.2f} {block_mb / full_mb:>12.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
