"""The lab's sparse-pattern attentions (block-sparse routine, ``lab/attention/sparse.py``) vs dense SDPA.

Prints, in one run, forward + backward wall time and peak extra memory of each pattern at its
default settings, beside two dense baselines, with ratios:

- ``sdpa causal``  PyTorch scaled_dot_product_attention(is_causal=True): full attention, the lab's
                   ``full`` (a fused kernel: O(T) memory on a flash-capable backend)
- ``sdpa masked``  the same SDPA given the pattern's own (T x T) boolean mask: the dense way to get
                   exactly the pattern's output (built from the routine's pattern, outside the timing)

Each (pattern, length) runs in a fresh process so the peak is its own: peak resident memory (VmHWM)
on the CPU, the allocator's peak on CUDA, minus what was allocated with the inputs in place.

    python benchmarks/lab_sparse.py                             # T = 1k, 2k, 4k; 4 heads, head dim 16
    python benchmarks/lab_sparse.py --heads 8 --dim 64 --device cuda
    python benchmarks/lab_sparse.py --train          # lab training tokens/s of each model, ratio to rope

``--train`` times training steps of the lab's tiny model (batch 8 x 128 tokens, AdamW) for ``rope`` and
``rope+<attention>``, the models taking turns step block by step block so a shared machine's changing
load falls on all alike; median tokens/s of the rounds, ratio to ``rope`` (full attention).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

PATTERNS = ["dilated", "longformer", "bigbird", "longnet", "blockwise"]


def _dense_mask(module, length, device):
    """The pattern as a (H, T, T) bool mask, scattered from its (index, allowed) lists."""
    import torch

    index, allowed = module.pattern(length, device)
    g, n, block, slots = allowed.shape
    rows = torch.arange(n * block, device=device).view(1, n, block, 1).expand(g, n, block, slots)
    cols = index[:, :, None, :].expand(g, n, block, slots)
    keep = allowed & (cols >= 0) & (cols < length) & (rows < length)
    mask = torch.zeros(g, length, length, dtype=torch.bool, device=device)
    heads = torch.arange(g, device=device).view(g, 1, 1, 1).expand_as(keep)
    mask[heads[keep], rows[keep], cols[keep]] = True
    return mask


def _measure(method: str, length: int, heads: int, dim: int, device: str, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    from longlab.eval import memory
    from longlab.lab.components import component
    from longlab.lab.positions.base import ModelShape

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    q, k, v = (torch.randn(1, heads, length, dim, device=dev, requires_grad=True) for _ in range(3))
    positions = torch.arange(length, device=dev)
    pattern, _, baseline = method.partition(" vs ")
    if baseline == "":
        module = component(pattern).build(ModelShape(heads * dim, heads, dim, 128), 0)
        run = lambda: module(q, k, v, positions).sum().backward()  # noqa: E731
    elif baseline == "sdpa causal":
        run = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()  # noqa: E731
    else:  # sdpa masked with the pattern's own mask
        mask = _dense_mask(component(pattern).build(ModelShape(heads * dim, heads, dim, 128), 0), length, dev)
        run = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()  # noqa: E731
    run()  # warm-up
    for x in (q, k, v):
        x.grad = None
    if dev.type == "cuda":
        torch.cuda.synchronize()
    memory.reset_peak(dev)
    before = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else memory.resident_bytes()
    began = time.perf_counter()
    run()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "peak_mb": (memory.peak_bytes(dev) - before) / 2**20}


def _train_throughput(args) -> None:
    import statistics

    import torch

    from longlab.lab.components import model_spec
    from longlab.lab.model import SIZES, LabModel

    torch.set_num_threads(args.threads)
    specs = ["rope", "rope+sliding", *(f"rope+{p}" for p in args.patterns.split(","))]
    models = {}
    for spec in specs:
        torch.manual_seed(0)
        position, attention = model_spec(spec)
        model = LabModel(1024, SIZES["tiny"], position, train_length=128, attention=attention).to(args.device)
        models[spec] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    ids = torch.randint(0, 1024, (8, 128), device=args.device)
    rates: dict[str, list[float]] = {spec: [] for spec in specs}
    for _ in range(args.rounds):
        for spec, (model, optimizer) in models.items():
            began = time.perf_counter()
            for _ in range(args.steps):
                optimizer.zero_grad()
                model.loss(ids).backward()
                optimizer.step()
            rates[spec].append(args.steps * ids.numel() / (time.perf_counter() - began))
    full = statistics.median(rates["rope"])
    print(f"lab training, tiny model, batch 8 x 128, {args.rounds} rounds of {args.steps} steps, {args.device}\n")
    print("| model | tokens/s (median) | ratio to rope |\n|---|---|---|")
    for spec in specs:
        rate = statistics.median(rates[spec])
        print(f"| `{spec}` | {rate:.0f} | {rate / full:.2f} |")


def _in_fresh_process(method: str, length: int, args) -> dict:
    command = [sys.executable, __file__, "--one", method, "--lengths", str(length), "--heads", str(args.heads),
               "--dim", str(args.dim), "--device", args.device, "--threads", str(args.threads)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,2048,4096")
    parser.add_argument("--patterns", default=",".join(PATTERNS))
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train", action="store_true", help="lab training tokens/s instead")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train:
        _train_throughput(args)
        return
    if args.one:
        print(json.dumps(_measure(args.one, int(args.lengths), args.heads, args.dim, args.device, args.threads)))
        return
    print(f"forward + backward, {args.heads} heads, head dim {args.dim}, float32, {args.device}, "
          f"{args.threads} thread(s); time s and peak extra MB, ratio = pattern / baseline\n")  # fmt: skip
    baselines = "sdpa causal s | MB | time ratio | MB ratio | sdpa masked s | MB | time ratio | MB ratio"
    print(f"| pattern | T | s | MB | {baselines} |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for length in (int(x) for x in args.lengths.split(",")):
        causal = _in_fresh_process("- vs sdpa causal", length, args)
        for pattern in args.patterns.split(","):
            ours = _in_fresh_process(pattern, length, args)
            masked = _in_fresh_process(f"{pattern} vs sdpa masked", length, args)
            cells = [f"{ours['seconds']:.3f}", f"{ours['peak_mb']:.1f}"]
            for base in (causal, masked):
                time_ratio = ours["seconds"] / base["seconds"]
                memory_ratio = ours["peak_mb"] / max(base["peak_mb"], 0.1)
                cells += [
                    f"{base['seconds']:.3f}",
                    f"{base['peak_mb']:.1f}",
                    f"{time_ratio:.2f}",
                    f"{memory_ratio:.2f}",
                ]
            print(f"| {pattern} | {length} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
