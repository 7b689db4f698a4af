"""The lab's blockwise CoPE attention vs the naive form that builds every (L x L) matrix.

Prints, in one run and side by side with their ratio: forward + backward wall time, and the largest
single tensor an evaluation forward (no grad) creates, measured by intercepting every torch op:

- ``blockwise``  :func:`longlab.attention.contextual.contextual_attention`, 128 x 128 blocks,
  autograd per query block under checkpoint
- ``naive``      the paper's full-matrix form: gates, suffix cumsum, gather and softmax over (H, L, L)

    python benchmarks/lab_cope.py                       # L = 512, 1024, 2048; 4 heads, head dim 16
    python benchmarks/lab_cope.py --lengths 4096 --heads 8 --dim 64
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from longlab.attention.contextual import contextual_attention


def naive(q, k, v, e):
    t, scale = q.shape[2], 1 / math.sqrt(q.shape[-1])
    future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    qk = q @ k.transpose(-1, -2)
    gates = torch.sigmoid(qk * scale).masked_fill(future, 0.0)
    p = gates.flip(-1).cumsum(-1).flip(-1).clamp(max=e.shape[0] - 1)
    z = q @ e.T
    floor = p.detach().floor()
    low, high = z.gather(-1, floor.long()), z.gather(-1, p.detach().ceil().long())
    logits = ((qk + low + (p - floor) * (high - low)) * scale).masked_fill(future, -math.inf)
    return torch.softmax(logits, dim=-1) @ v


class Largest(TorchDispatchMode):
    """The largest tensor (bytes) any op returns while active."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, tuple | list) else (out,):
            if isinstance(x, torch.Tensor):
                self.bytes = max(self.bytes, x.numel() * x.element_size())
        return out


def timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def largest_mb(fn, *args) -> float:
    with torch.no_grad(), Largest() as seen:
        fn(*args)
    return seen.bytes / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,1024,2048")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--npos", type=int, default=129)  # the lab's default: training length 128 + 1
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'L':>6} {'blockwise s':>12} {'naive s':>9} {'time ratio':>10} "
          f"{'largest MB blockwise':>21} {'largest MB naive':>17} {'memory ratio':>12} {'max |diff|':>11}")  # fmt: skip
    for length in (int(x) for x in args.lengths.split(",")):
        q, k, v = (torch.randn(1, args.heads, length, args.dim, requires_grad=True) for _ in range(3))
        e = (0.1 * torch.randn(args.npos, args.dim)).requires_grad_()
        contextual_attention(q, k, v, e).sum().backward()  # warm-up
        t_ours = timed(lambda q=q, k=k, v=v, e=e: contextual_attention(q, k, v, e).sum().backward())
        t_naive = timed(lambda q=q, k=k, v=v, e=e: naive(q, k, v, e).sum().backward())
        mb_ours, mb_naive = largest_mb(contextual_attention, q, k, v, e), largest_mb(naive, q, k, v, e)
        with torch.no_grad():
            diff = (contextual_attention(q, k, v, e) - naive(q, k, v, e)).abs().max().item()
        print(f"{length:>6} {t_ours:>12.3f} {t_naive:>9.3f} {t_ours / t_naive:>10.2f} "
              f"{mb_ours:>21.2f} {mb_naive:>17.2f} {mb_ours / mb_naive:>12.4f} {diff:>11.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
