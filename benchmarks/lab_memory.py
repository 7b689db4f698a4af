"""The lab's memory attentions (``infini``, ``memorizing``) against full causal attention and against
their own local part (in-segment attention), forward + backward wall time side by side as ratios;
then the memorizing layer's kNN search: faiss ``IndexFlatIP`` (the CPU backend) vs ``torch.topk``.

    python benchmarks/lab_memory.py                       # L = 512, 2048; 4 heads, head dim 16, segment 32
    python benchmarks/lab_memory.py --lengths 4096 --heads 8 --dim 64
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from longlab.cache.far import FaissIndex, TorchIndex
from longlab.lab.attention.memorizing import MemorizingAttention, nearest
from longlab.lab.attention.recurrence import in_segment_attention
from longlab.lab.components import component
from longlab.lab.positions.base import ModelShape


def timed(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    began = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - began) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,2048")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--segment", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = ModelShape(args.heads * args.dim, args.heads, args.dim, 128)
    modules = {
        "infini": component(f"infini:segment={args.segment}").build(shape, 0),
        "infini:delta": component(f"infini:segment={args.segment},update=delta").build(shape, 0),
        "memorizing": MemorizingAttention(args.segment, 2048, 32, args.heads),
    }
    print(f"{'attention':<13} {'L':>5} {'ours s':>8} {'full s':>8} {'/ full':>7} {'local s':>8} {'/ local':>8}")
    for length in (int(x) for x in args.lengths.split(",")):
        q, k, v = (torch.randn(1, args.heads, length, args.dim, requires_grad=True) for _ in range(3))
        positions = torch.arange(length)
        full = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward())  # noqa: B023
        local = timed(lambda: in_segment_attention(q, k, v, args.segment).sum().backward())  # noqa: B023
        for name, module in modules.items():
            ours = timed(lambda m=module: m(q, k, v, positions).sum().backward())  # noqa: B023
            print(f"{name:<13} {length:>5} {ours:>8.4f} {full:>8.4f} {ours / full:>7.1f} "
                  f"{local:>8.4f} {ours / local:>8.1f}")  # fmt: skip
    print(f"\n{'kNN search (rows x memory)':<28} {'faiss s':>8} {'torch.topk s':>13} {'ratio':>6} {'same slots':>11}")
    for memory in (512, 2048):
        queries, keys = torch.randn(args.heads, args.segment, args.dim), torch.randn(args.heads, memory, args.dim)
        f_s = timed(lambda: nearest(queries, keys, 32, FaissIndex))  # noqa: B023
        t_s = timed(lambda: nearest(queries, keys, 32, TorchIndex))  # noqa: B023
        same = torch.equal(nearest(queries, keys, 32, FaissIndex), nearest(queries, keys, 32, TorchIndex))
        print(f"{f'{args.heads} x {memory}':<28} {f_s:>8.5f} {t_s:>13.5f} {f_s / t_s:>6.2f} {same!s:>11}")


if __name__ == "__main__":
    main()
