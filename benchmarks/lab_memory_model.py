"""The lab's memory models at evaluation lengths vs the full-attention model they replace.

Prints, in one run, side by side with the ratio to the baseline:

1. attention alone (no_grad forward, 1 x heads x L x dim): landmark top-k inference (§3.2) and the
   landmark training form (every block) vs causal SDPA over all L keys, with the most scores each
   holds at once (landmark: one query block against its own block, the landmarks and its retrieved
   blocks; SDPA's reference: the L x L matrix);
2. the whole tiny lab model (no_grad, one row of L tokens): ``rope+rmt`` and ``rope+landmark`` vs ``rope``.

    python benchmarks/lab_memory_model.py                         # L = 512, 1024, 2048
    python benchmarks/lab_memory_model.py --lengths 4096 --threads 2
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from longlab.lab.components import component, model_spec
from longlab.lab.model import SIZES, LabModel
from longlab.lab.positions.base import ModelShape


def timed(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    began = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - began) / repeats


@torch.no_grad()
def attention_rows(lengths: list[int], heads: int, dim: int, block: int, top_k: int) -> None:
    shape = ModelShape(heads * dim, heads, dim, 128)
    retrieve = component(f"landmark:block={block},top_k={top_k}").build(shape, 0).eval()
    every = component(f"landmark:block={block},top_k={top_k}").build(shape, 0).train()
    print(f"{'L':>6} {'sdpa s':>8} {'top-k s':>8} {'ratio':>6} {'all-blocks s':>12} {'ratio':>6} "
          f"{'scores top-k':>12} {'scores L x L':>12} {'ratio':>7}")  # fmt: skip
    for length in lengths:
        t = length + length // block  # with landmarks inserted
        q, k, v = (torch.randn(1, heads, t, dim) for _ in range(3))
        positions = torch.arange(t)
        base = timed(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        ours = timed(lambda q=q, k=k, v=v, p=positions: retrieve(q, k, v, p))
        train_form = timed(lambda q=q, k=k, v=v, p=positions: every(q, k, v, p))
        # scores of the last query block: own block + every landmark + top_k retrieved blocks
        held = (block + 1) * (block + math.ceil(t / (block + 1)) + top_k * block)
        print(f"{length:>6} {base:>8.4f} {ours:>8.4f} {ours / base:>6.2f} {train_form:>12.4f} "
              f"{train_form / base:>6.2f} {held:>12} {t * t:>12} {held / (t * t):>7.4f}")  # fmt: skip


@torch.no_grad()
def model_rows(lengths: list[int]) -> None:
    models = {}
    for spec in ("rope", "rope+rmt", "rope+landmark"):
        torch.manual_seed(0)
        position, attention = model_spec(spec)
        models[spec] = LabModel(1024, SIZES["tiny"], position, 128, attention=attention).eval()
    print(f"\n{'L':>6} " + " ".join(f"{spec + ' s':>17} {'ratio':>6}" for spec in models))
    for length in lengths:
        ids = torch.randint(0, 1024, (1, length))
        seconds = {spec: timed(lambda m=m, ids=ids: m.model(ids), repeats=1) for spec, m in models.items()}
        cells = " ".join(f"{s:>17.3f} {s / seconds['rope']:>6.2f}" for s in seconds.values())
        print(f"{length:>6} {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,1024,2048")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    attention_rows(lengths, args.heads, args.dim, args.block, args.top_k)
    model_rows(lengths)


if __name__ == "__main__":
    main()
