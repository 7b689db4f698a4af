"""The lab's head- and layer-sharing attentions (GQA, MQA, CLA) and differential attention vs
multi-head attention (``rope``, full softmax): KV cache per token and forward + backward time.

Prints, in one run and side by side with their ratios, for each component at each length:

- ``KV B/tok``  keys and values a decoder caches per token, all layers (``lab.kv_bytes``), and the
  cache a sequence of that length holds;
- ``s``         wall time of one forward + backward of the whole lab model (tiny size, batch 1).

    python benchmarks/lab_heads.py                        # L = 512, 2048; tiny model, 1 thread
    python benchmarks/lab_heads.py --size small --lengths 1024,4096
"""

from __future__ import annotations

import argparse
import time

import torch

from longlab.lab.components import model_spec
from longlab.lab.kv_bytes import kv_bytes_per_token
from longlab.lab.model import SIZES, LabModel

COMPONENTS = ("rope+gqa:kv_heads=2", "rope+mqa", "rope+cla", "rope+cla:kv_heads=1", "rope+differential")


def build(spec: str, size: str) -> LabModel:
    torch.manual_seed(0)
    position, attention = model_spec(spec)
    return LabModel(1024, SIZES[size], position, train_length=128, attention=attention)


def seconds(model: LabModel, ids: torch.Tensor, repeats: int) -> float:
    model.loss(ids).backward()  # warm-up
    began = time.perf_counter()
    for _ in range(repeats):
        model.loss(ids).backward()
    return (time.perf_counter() - began) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,2048")
    parser.add_argument("--size", default="tiny", choices=tuple(SIZES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    full = build("rope", args.size)
    full_kv = kv_bytes_per_token(full)
    print(f"{'component':<22} {'L':>5} {'KV B/tok':>8} {'full':>6} {'KV ratio':>8} {'KV MB at L':>10} "
          f"{'s':>7} {'full s':>7} {'time ratio':>10}")  # fmt: skip
    for length in (int(x) for x in args.lengths.split(",")):
        ids = torch.randint(0, 1024, (1, length), generator=torch.Generator().manual_seed(length))
        full_s = seconds(full, ids, args.repeats)
        for spec in COMPONENTS:
            model = build(spec, args.size)
            kv, s = kv_bytes_per_token(model), seconds(model, ids, args.repeats)
            print(f"{spec:<22} {length:>5} {kv:>8} {full_kv:>6} {kv / full_kv:>8.2f} {kv * length / 2**20:>10.2f} "
                  f"{s:>7.3f} {full_s:>7.3f} {s / full_s:>10.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
