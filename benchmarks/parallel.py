"""Sequence-parallel benchmark: the bundled model's forward + backward at a fixed total length, split
over 1, 2 and 4 processes (gloo on CPU), launched with torchrun exactly as a user would.

For every configuration it prints, per rank (worst rank shown): peak memory, step wall time, step CPU
time, the CPU time inside the attention kernels (min-max over ranks), the attention
bytes the rank sent (measured by longlab's counters) next to the analytic volume (ring forward:
(N-1)/N of the global K+V per layer), and the attention FLOPs per rank (min-max, to show balance).

    python benchmarks/parallel.py                       # 8192 tokens, the default table
    python benchmarks/parallel.py --length 2048 --steps 1 --configs 1:ring:zigzag 2:ring:zigzag

Each configuration is one ``torchrun --nproc-per-node N -m longlab.parallel.demo`` run (whole model:
embeddings, 6 layers, LM head, loss, backward); one torch thread per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_CONFIGS = [
    "1:ring:zigzag",
    "2:ring:zigzag",
    "4:ring:zigzag",
    "4:ring:contiguous",
    "2:ulysses:zigzag",
    "4:ulysses:zigzag",
]
MIB = 2**20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, mode: str, layout: str, length: int, steps: int, spec: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", f"--master-port={_free_port()}",
            "-m", "longlab.parallel.demo", "--length", str(length), "--mode", mode, "--layout", layout,
            "--steps", str(steps), "--spec", spec, "--json", str(out),
        ]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1")
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
        return json.loads(out.read_text())


def row(world: int, mode: str, layout: str, result: dict) -> str:
    ranks = result["ranks"]
    worst = lambda key: max(r[key] for r in ranks)  # noqa: E731
    flops = [r["forward_flops"] / 1e9 for r in ranks]
    kernel = [r["attention_cpu_s"] for r in ranks]
    fwd, fwd_analytic = worst("forward_bytes"), worst("analytic_forward_bytes")
    step, step_analytic = worst("step_bytes"), worst("analytic_step_bytes")
    ratio = f"{fwd / fwd_analytic:.3f}" if fwd_analytic else "-"
    return (
        f"| {world} | {mode} | {layout} | {ranks[0]['tokens']} | {worst('peak_mb'):.0f} | {worst('step_s'):.2f} | "
        f"{worst('step_cpu_s'):.2f} | {min(kernel):.2f}–{max(kernel):.2f} | "
        f"{fwd / MIB:.1f} | {fwd_analytic / MIB:.1f} | {ratio} | {step / MIB:.1f} | {step_analytic / MIB:.1f} | "
        f"{min(flops):.1f}–{max(flops):.1f} | {ranks[0]['loss']:.4f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=8192, help="total sequence length (fixed across world sizes)")
    parser.add_argument("--steps", type=int, default=2, help="steps per run; time is the fastest step")
    parser.add_argument("--spec", default="none")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="world:mode:layout entries")
    args = parser.parse_args()
    print(f"bundled tiny model, {args.length} tokens, batch 1, fp32, spec {args.spec!r}, 1 thread per rank, gloo")
    print(
        "| ranks | mode | layout | tokens/rank | peak MiB/rank | step s | step CPU s/rank | attn kernel CPU s/rank | "
        "fwd sent MiB/rank | analytic | ratio | "
        "fwd+bwd sent MiB/rank | analytic | attn fwd GFLOP/rank | loss |"
    )
    print("|" + "---|" * 15)
    for config in args.configs:
        world, mode, layout = config.split(":")
        result = run(int(world), mode, layout, args.length, args.steps, args.spec)
        print(row(int(world), mode, layout, result), flush=True)


if __name__ == "__main__":
    main()
