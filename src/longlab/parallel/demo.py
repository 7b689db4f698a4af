"""Long-sequence forward + backward of the bundled model with the sequence split over processes.

    torchrun --nproc-per-node 4 -m longlab.parallel.demo --length 8192
    python -m longlab.parallel.demo --length 2048            # one process, same code path

Each rank reports its wall time, its CPU time (the work it did, whether or not it had a core to
itself), the CPU time inside the attention kernels, peak memory (CPU: resident memory above the
pre-step baseline, sampled every millisecond; GPU: torch's peak allocation) and the bytes it sent,
next to the analytic volume.
Inputs are random token ids (same on every rank); the loss is the exact global next-token loss.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from longlab.bridge import apply
from longlab.loading import load
from longlab.parallel.comm import distributed_backend
from longlab.parallel.shard import MODES, shard
from longlab.parallel.stats import reset_stats, stats

MB = 2**20  # MiB


class PeakMemory:
    """Peak memory above the baseline taken at entry: torch's allocator on GPU, sampled RSS on CPU."""

    def __init__(self, device: torch.device, interval: float = 0.001) -> None:
        self.device, self.interval = device, interval
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self.base)
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss() - self.base)


def analytic_bytes(mode: str, world: int, layers: int, batch: int, local: int, config, element: int) -> tuple[int, int]:
    """(forward, forward + backward) attention bytes one rank sends, from the algorithms' schedules.

    Ring: the forward passes K/V N-1 hops, i.e. (N-1)/N of the global K+V per layer; the backward
    passes them again and sends the float32 dK/dV accumulators N hops (the last hop home).
    Ulysses: (N-1)/N of this rank's q, k, v goes out and (N-1)/N of its output comes back, per
    layer, forward and again (the gradients) backward.
    """
    if world == 1:
        return 0, 0
    d, hq, hk = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    kv = 2 * batch * hk * local * d * element  # this rank's K + V
    if mode == "ring":
        forward = layers * (world - 1) * kv
        return forward, 2 * forward + layers * world * kv * 4 // element
    q = batch * hq * local * d * element  # q and the attention output have the same size
    forward = layers * (world - 1) * (2 * q + kv) // world
    return forward, 2 * forward


def _attention_bytes(counters: dict) -> int:
    """Bytes of the attention algorithm itself (K/V, dK/dV, all-to-all), not positions or the loss."""
    return sum(v for k, v in counters["bytes_sent"].items() if k in ("kv", "dkv", "all_to_all"))


def _device(kind: str) -> torch.device:
    """This rank's device: the CPU, or the GPU torchrun assigns it (LOCAL_RANK)."""
    if kind == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _init(device: torch.device) -> tuple[int, int]:
    """Join the process group with the backend for this device (NCCL for CUDA, gloo for the CPU)."""
    backend = distributed_backend(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before NCCL starts: each rank's communicator on its own GPU
    if "RANK" in os.environ:  # torchrun
        dist.init_process_group(backend)
    else:  # one process, same code path
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m longlab.parallel.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=4096, help="global sequence length (tokens)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--spec", default="none", help="longlab method spec, e.g. yarn:factor=8")
    parser.add_argument("--mode", choices=MODES, default="ring")
    parser.add_argument("--layout", choices=("zigzag", "contiguous"), default="zigzag")
    parser.add_argument("--steps", type=int, default=2, help="forward+backward steps; time is the fastest")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--model", default="tiny", help="bundled model name or checkpoint folder")
    parser.add_argument("--json", type=Path, help="rank 0 writes every rank's numbers here")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu",
        help="cpu: gloo; cuda: NCCL and one GPU per rank (torchrun's LOCAL_RANK)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = _device(args.device)
    rank, world = _init(device)
    model, _ = load(args.model, dtype=torch.float32)
    model.to(device).train()
    apply(model, args.spec)
    # drawn on the host, then moved: the same ids on every rank and every device
    generator = torch.Generator(device="cpu").manual_seed(0)
    shape = (args.batch, args.length)
    ids = torch.randint(2, model.config.vocab_size, shape, generator=generator, device="cpu").to(device)

    times, losses = [], []
    with shard(model, layout=args.layout, mode=args.mode) as sp:
        local_ids, position_ids = sp.split(ids)
        labels = sp.labels(ids)
        dist.barrier()
        with PeakMemory(device) as memory:
            for _ in range(args.steps):
                model.zero_grad(set_to_none=True)
                reset_stats()
                start, cpu_start = time.perf_counter(), time.process_time()
                logits = model(input_ids=local_ids, position_ids=position_ids, use_cache=False).logits
                loss = sp.loss(logits, labels)
                middle = time.perf_counter()
                forward = stats().as_dict()
                loss.backward()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                end, cpu_end = time.perf_counter(), time.process_time()
                attention = stats().as_dict()  # before the gradient all-reduce, which DDP would do anyway
                sp.all_reduce_gradients()
                times.append((middle - start, end - middle, cpu_end - cpu_start))
                losses.append(float(loss.detach()))
                del logits, loss
    config = model.config
    element = next(model.parameters()).element_size()
    local = sp.layout.local_length
    analytic = analytic_bytes(args.mode, world, config.num_hidden_layers, args.batch, local, config, element)
    report = {
        "rank": rank,
        "world": world,
        "tokens": local,
        "forward_s": min(t[0] for t in times),
        "backward_s": min(t[1] for t in times),
        "step_s": min(t[0] + t[1] for t in times),
        "step_cpu_s": min(t[2] for t in times),  # every thread of the process, gloo's included
        "attention_cpu_s": attention["forward_cpu_s"] + attention["backward_cpu_s"],  # last step's kernels
        "peak_mb": memory.peak / MB,
        "sent": attention["bytes_sent"],
        "forward_bytes": _attention_bytes(forward),
        "step_bytes": _attention_bytes(attention),
        "analytic_forward_bytes": analytic[0],
        "analytic_step_bytes": analytic[1],
        "forward_flops": attention["forward_flops"],
        "loss": losses[-1],
    }
    reports: list = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        print(
            f"{args.mode} attention, {args.layout} layout, {world} rank(s), {args.length} tokens, spec {args.spec!r}, "
            f"{device.type}, {args.threads} thread(s)/rank, loss {losses[-1]:.4f}"
        )
        print(f"{'rank':>4} {'tokens':>6} {'fwd s':>6} {'bwd s':>6} {'peak MiB':>8} {'fwd sent MiB':>12} "
              f"{'(analytic)':>10} {'fwd+bwd sent MiB':>16} {'(analytic)':>10} {'attn GFLOP':>10} "
              f"{'attn CPU s':>10}")  # fmt: skip
        for r in reports:
            print(
                f"{r['rank']:>4} {r['tokens']:>6} {r['forward_s']:>6.2f} {r['backward_s']:>6.2f} {r['peak_mb']:>8.1f} "
                f"{r['forward_bytes'] / MB:>12.2f} {r['analytic_forward_bytes'] / MB:>10.2f} "
                f"{r['step_bytes'] / MB:>16.2f} {r['analytic_step_bytes'] / MB:>10.2f} "
                f"{r['forward_flops'] / 1e9:>10.2f} {r['attention_cpu_s']:>10.2f}"
            )
        if args.json:
            args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "ranks": reports}))
    dist.destroy_process_group()
    return report


if __name__ == "__main__":
    main()
