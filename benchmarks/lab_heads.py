"""The lab's head- and layer-sharing attentions (GQA, MQA, CLA) and differential attention vs
multi-head attention (``rope``, full softmax): KV cache per token and forward + backward time.

Prints, in one run and side by side with their ratios, for each component at each length:

- ``KV B/tok``  keys and values a decoder caches per token, all layers (``lab.kv_bytes``), and the
  cache a sequence of that length holds;
- ``s``         wall time of one forward + backward of the whole lab model (tiny size), the median
  of ``--repeats``; the models take turns within each repeat, so a shared machine's changing load
  falls on all of them alike.

    python benchmarks/lab_heads.py                        # 8 x 128 (a training batch), 1 x 512, 1 x 2048
    python benchmarks/lab_heads.py --size small --shapes 1x1024,1x4096
"""

from __future__ import annotations

import argparse
import statistics
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


def seconds(model: LabModel, ids: torch.Tensor) -> float:
    began = time.perf_counter()
    model.loss(ids).backward()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="8x128,1x512,1x2048", help="batch x length, comma-separated")
    parser.add_argument("--size", default="tiny", choices=tuple(SIZES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {spec: build(spec, args.size) for spec in ("rope", *COMPONENTS)}
    full_kv = kv_bytes_per_token(models["rope"])
    print(f"{'component':<22} {'B x L':>7} {'KV B/tok':>8} {'full':>6} {'KV ratio':>8} {'KV MB at L':>10} "
          f"{'s':>7} {'full s':>7} {'time ratio':>10}")  # fmt: skip
    for shape in args.shapes.split(","):
        batch, length = (int(x) for x in shape.split("x"))
        ids = torch.randint(0, 1024, (batch, length), generator=torch.Generator().manual_seed(length))
        times: dict[str, list[float]] = {spec: [] for spec in models}
        for repeat in range(args.repeats + 1):
            for spec, model in models.items():
                took = seconds(model, ids)
                if repeat:  # the first round warms up
                    times[spec].append(took)
        full_s = statistics.median(times["rope"])
        for spec in COMPONENTS:
            kv, s = kv_bytes_per_token(models[spec]), statistics.median(times[spec])
            print(f"{spec:<22} {shape:>7} {kv:>8} {full_kv:>6} {kv / full_kv:>8.2f} {kv * length / 2**20:>10.2f} "
                  f"{s:>7.3f} {full_s:>7.3f} {s / full_s:>10.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
