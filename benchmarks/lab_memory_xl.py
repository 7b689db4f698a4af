"""The lab's Transformer-XL attention (per-segment blocks) vs the same pattern as one masked L x L matrix.

Prints, in one run, forward + backward wall time and the scores each form holds at once, side by side
with their ratio, and the largest output difference between the two:

- ``segmented``  :func:`longlab.lab.attention.recurrence.segment_attention`: one segment x
  (memory + segment) block per segment, memory keys/values detached
- ``masked``     softmax over the full (L x L) score matrix masked to the same keys (the memory keys
  are detached by substituting k.detach() / v.detach() where a query reads another segment)

    python benchmarks/lab_memory_xl.py                        # L = 512, 1024, 2048; segment 32, memory 32
    python benchmarks/lab_memory_xl.py --segment 64 --memory 128
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from longlab.lab.attention.recurrence import segment_attention


def masked(q, k, v, segment, memory):
    """The XL pattern as an L x L mask: query i of the segment starting at s sees s - memory <= j <= i;
    scores/values of keys before s come from the detached k, v (XL's stop-gradient)."""
    t = q.shape[2]
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    start = i // segment * segment
    allowed = (j <= i) & (j >= start - memory)
    inside = (j >= start)[None, None]
    scale = 1 / math.sqrt(q.shape[-1])
    scores = torch.where(inside, q @ k.transpose(-1, -2), q @ k.detach().transpose(-1, -2)) * scale
    weights = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1)
    return (weights * inside) @ v + (weights * ~inside) @ v.detach()


def timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,1024,2048")
    parser.add_argument("--segment", type=int, default=32)
    parser.add_argument("--memory", type=int, default=32)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    s, m = args.segment, args.memory
    print(f"{'L':>6} {'segmented s':>12} {'masked s':>9} {'time ratio':>10} "
          f"{'scores MB segmented':>20} {'scores MB masked':>17} {'memory ratio':>12} {'max |diff|':>11}")  # fmt: skip
    for length in (int(x) for x in args.lengths.split(",")):
        q, k, v = (torch.randn(1, args.heads, length, args.dim, requires_grad=True) for _ in range(3))

        def ours(q=q, k=k, v=v):
            segment_attention(q, k, v, s, m).sum().backward()

        def reference(q=q, k=k, v=v):
            masked(q, k, v, s, m).sum().backward()

        ours()  # warm-up
        t_ours, t_masked = timed(ours), timed(reference)
        with torch.no_grad():
            diff = (segment_attention(q, k, v, s, m) - masked(q, k, v, s, m)).abs().max().item()
        # the scores each form holds at once, float32, per head
        count = math.ceil(length / s)
        ours_mb = args.heads * count * s * (s + m) * 4 / 2**20
        full_mb = args.heads * length * length * 4 / 2**20
        print(f"{length:>6} {t_ours:>12.3f} {t_masked:>9.3f} {t_ours / t_masked:>10.2f} "
              f"{ours_mb:>20.2f} {full_mb:>17.2f} {ours_mb / full_mb:>12.4f} {diff:>11.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
