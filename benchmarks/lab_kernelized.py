"""The lab's kernelized attentions (linear, performer, cosformer) vs exact causal softmax attention (SDPA).

Prints, in one run, side by side with their ratio:

1. training: forward + backward wall time, peak memory above what was held before (the CUDA
   allocator's peak on a GPU; on the CPU the process's peak resident size, coarse: the allocator
   reuses freed pages) and the MB autograd saves for the backward, at each length, ours vs
   ``F.scaled_dot_product_attention(is_causal=True)``;
2. decoding: the time of one token's step at each context length, the recurrent form (constant
   state) vs exact attention over a KV cache of that length (append + SDPA), and the bytes each
   carries (the state vs the cache).

    python benchmarks/lab_kernelized.py                          # 1k..8k tokens; 4 heads, head dim 16 (lab tiny)
    python benchmarks/lab_kernelized.py --device cuda --heads 8 --dim 64
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from longlab.eval import memory
from longlab.lab.components import component
from longlab.lab.positions.base import ModelShape

SPECS = ("linear", "performer", "cosformer")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device: torch.device, repeats: int) -> tuple[float, float]:
    """(seconds per call, peak MB above what was held before) of ``fn``, after one warm-up call."""
    fn()
    sync(device)
    before = memory.resident_bytes() if device.type == "cpu" else torch.cuda.memory_allocated(device)
    memory.reset_peak(device)
    began = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    seconds = (time.perf_counter() - began) / repeats
    peak = memory.peak_bytes(device)
    return seconds, (peak - before) / 2**20 if peak is not None and before is not None else float("nan")


def saved_mb(forward, inputs) -> float:
    """MB that autograd keeps for the backward of ``forward()`` (distinct storages, the inputs excluded):
    the activation memory a training step holds per attention call, measured the same way on any device."""
    skip = {x.untyped_storage().data_ptr() for x in inputs}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values()) / 2**20


def training(args, device: torch.device) -> None:
    print(f"{'attention':<10} {'T':>6} {'ours s':>9} {'sdpa s':>9} {'time ratio':>10} {'ours peak MB':>12} "
          f"{'sdpa peak MB':>12} {'ours saved MB':>13} {'sdpa saved MB':>13} {'saved ratio':>11}")  # fmt: skip
    shape = ModelShape(args.heads * args.dim, args.heads, args.dim, 128)
    for length in (int(x) for x in args.lengths.split(",")):
        q, k, v = (torch.randn(1, args.heads, length, args.dim, device=device, requires_grad=True) for _ in range(3))
        positions = torch.arange(length, device=device)

        def exact(q=q, k=k, v=v):
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

        t_exact, m_exact = measure(exact, device, args.repeats)
        s_exact = saved_mb(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v))
        for spec in SPECS:
            module = component(spec).build(shape, 0).to(device)

            def ours(q=q, k=k, v=v, positions=positions, module=module):
                module(q, k, v, positions).sum().backward()

            t_ours, m_ours = measure(ours, device, args.repeats)
            forward = lambda q=q, k=k, v=v, positions=positions, module=module: module(q, k, v, positions)  # noqa: E731
            s_ours = saved_mb(forward, (q, k, v))
            print(f"{spec:<10} {length:>6} {t_ours:>9.4f} {t_exact:>9.4f} {t_ours / t_exact:>10.2f} {m_ours:>12.1f} "
                  f"{m_exact:>12.1f} {s_ours:>13.2f} {s_exact:>13.2f} {s_ours / s_exact:>11.2f}")  # fmt: skip


def decoding(args, device: torch.device) -> None:
    print(f"\n{'attention':<10} {'context':>8} {'step ms':>9} {'kv-cache ms':>12} {'time ratio':>10} "
          f"{'state KB':>9} {'cache KB':>9}")  # fmt: skip
    shape = ModelShape(args.heads * args.dim, args.heads, args.dim, 128)
    step_shape = (1, args.heads, args.dim)
    with torch.no_grad():
        for length in (int(x) for x in args.lengths.split(",")):
            keys, values = (torch.randn(1, args.heads, length, args.dim, device=device) for _ in range(2))
            q, k, v = (torch.randn(*step_shape, device=device) for _ in range(3))

            def cached(keys=keys, values=values, q=q, k=k, v=v):
                # a growing cache: append this token's key and value, attend over all of them
                ks, vs = torch.cat([keys, k[:, :, None]], 2), torch.cat([values, v[:, :, None]], 2)
                return F.scaled_dot_product_attention(q[:, :, None], ks, vs)

            t_cache, _ = measure(cached, device, args.steps)
            cache_kb = 2 * keys.numel() * keys.element_size() / 1024
            for spec in SPECS:
                module = component(spec).build(shape, 0).to(device)
                decoder = module.recurrent(length + args.steps + 2)
                t_step, _ = measure(lambda d=decoder, q=q, k=k, v=v: d.step(q, k, v), device, args.steps)
                state_kb = (decoder.sums.state.numel() + decoder.sums.norm.numel()) * q.element_size() / 1024
                print(f"{spec:<10} {length:>8} {1e3 * t_step:>9.3f} {1e3 * t_cache:>12.3f} "
                      f"{t_step / t_cache:>10.2f} {state_kb:>9.1f} {cache_kb:>9.1f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,2048,4096,8192")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50, help="decode steps timed per context length")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    training(args, device)
    decoding(args, device)


if __name__ == "__main__":
    main()
