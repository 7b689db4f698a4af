"""``longlab finetune --ring N`` against the single-process ``longlab finetune``: time per step and peak
memory per rank for the same recipe, side by side, each as a ratio to the single process.

    python benchmarks/finetune_ring.py --out runs/ft-ring --length 2048 --steps 2 [--rings 1,2]

Each configuration is a real ``longlab finetune`` run (``python -m longlab.cli finetune`` for the single
process, ``torchrun --nproc-per-node N -m longlab.cli finetune --ring N`` for the ring), one torch
thread per process, on the CPU, batch 1, in its own folder under ``--out``. This script wraps each
process: peak memory is its resident memory above the level at the model's first forward (weights
loaded; so it is activations, gradients and the optimizer's state), sampled every millisecond by
longlab.parallel.demo's sampler; a step is timed from one optimizer step to the next (the first from the
first forward), in wall time (the slowest rank) and in the process's CPU time (every thread's, gloo's
included: on a shared machine it does not count the time spent waiting for a core); fastest step shown.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

MB = 2**20


def _worker(memory_file: Path, argv: list[str]) -> None:
    """One process of a run: ``longlab finetune argv``, writing its peak memory and the wall and CPU time
    of each optimizer step (from the first forward, then from one step to the next) next to ``memory_file``."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from longlab.cli import main
    from longlab.parallel.demo import PeakMemory

    memory = PeakMemory(torch.device("cpu"))
    marks: list[tuple[float, float]] = []  # (wall time, this process's CPU time: every thread's)

    def start(module, args):  # the first forward of any module: the weights are loaded, training begins
        if not marks:
            marks.append((time.perf_counter(), time.process_time()))
            memory.__enter__()

    def stepped(optimizer, args, kwargs):
        marks.append((time.perf_counter(), time.process_time()))

    handles = [torch.nn.modules.module.register_module_forward_pre_hook(start),
               register_optimizer_step_post_hook(stepped)]  # fmt: skip
    code = main(argv)
    for handle in handles:
        handle.remove()
    memory.__exit__(None, None, None)
    rank = int(os.environ.get("RANK", 0))
    steps = [(b[0] - a[0], b[1] - a[1]) for a, b in itertools.pairwise(marks)]
    report = {"peak_mb": memory.peak / MB, "step_s": [s[0] for s in steps], "step_cpu_s": [s[1] for s in steps]}
    memory_file.with_name(f"{memory_file.name}.rank{rank}").write_text(json.dumps(report))
    sys.exit(code)


def _run(out: Path, ring: int | None, args: argparse.Namespace) -> dict:
    name = "single" if ring is None else f"ring{ring}"
    folder = out / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    tokens = out / "train_tokens.npy"
    if tokens.exists():  # tokenized once, by the first run
        shutil.copy(tokens, folder / "train_tokens.npy")
    finetune = ["finetune", "--method", args.method, "--length", str(args.length), "--steps", str(args.steps),
                "--batch-size", "1", "--warmup-steps", "1", "--threads", "1", "--device", "cpu",
                "--out", str(folder)]  # fmt: skip
    memory = folder / "memory"
    script = [__file__, "--worker", str(memory), "--", *finetune]
    if ring is None:
        command = [sys.executable, *script]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ring)]
        command = [*launcher, *script, "--ring", str(ring)]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if not tokens.exists():
        shutil.copy(folder / "train_tokens.npy", tokens)
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    ranks = 1 if ring is None else ring
    reports = [json.loads(memory.with_name(f"memory.rank{r}").read_text()) for r in range(ranks)]
    return {
        "name": name,
        "ranks": ranks,
        "tokens_per_rank": args.length // ranks,
        "step_s": max(min(r["step_s"]) for r in reports),  # the fastest step; the slowest rank
        "step_cpu_s": [min(r["step_cpu_s"]) for r in reports],
        "losses": [entry["loss"] for entry in log],
        "peak_mb": [r["peak_mb"] for r in reports],
    }


def _spread(values: list[float], digits: int) -> str:
    low, high = min(values), max(values)
    return f"{low:.{digits}f}" if f"{low:.{digits}f}" == f"{high:.{digits}f}" else f"{low:.{digits}f}-{high:.{digits}f}"


def main() -> None:
    if "--worker" in sys.argv:
        at = sys.argv.index("--worker")
        _worker(Path(sys.argv[at + 1]), sys.argv[at + 3 :])  # after "--worker FILE --"
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/ft-ring"))
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--method", default="linear:factor=4")
    parser.add_argument("--rings", default="2", help="comma-separated ring sizes to compare with one process")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = [_run(args.out, None, args)] + [_run(args.out, int(n), args) for n in args.rings.split(",")]
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    base = results[0]
    print(f"longlab finetune, {args.length} tokens per row, batch 1, {args.method}, 1 thread per process, cpu")
    print(f"{'run':<7} {'ranks':>5} {'tokens/rank':>11} {'step s':>7} {'ratio':>6} {'CPU s/rank':>11} {'ratio':>6} "
          f"{'peak MiB/rank':>13} {'ratio':>6} {'max |loss - single|':>19}")  # fmt: skip
    for r in results:
        loss = max(abs(a - b) for a, b in zip(r["losses"], base["losses"], strict=True))
        ratios = (r["step_s"] / base["step_s"], max(r["step_cpu_s"]) / max(base["step_cpu_s"]),
                  max(r["peak_mb"]) / max(base["peak_mb"]))  # fmt: skip
        print(f"{r['name']:<7} {r['ranks']:>5} {r['tokens_per_rank']:>11} {r['step_s']:>7.2f} {ratios[0]:>6.2f} "
              f"{_spread(r['step_cpu_s'], 2):>11} {ratios[1]:>6.2f} {_spread(r['peak_mb'], 0):>13} {ratios[2]:>6.2f} "
              f"{loss:>19.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
