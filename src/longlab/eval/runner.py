"""The evaluation runner: methods x tasks x lengths x samples, one JSON line per sample.

Results are appended to ``results.jsonl`` as each sample finishes (flushed and synced), so an
interrupted run loses at most the sample in flight; rerunning with the same ``--out`` skips every
(method, task, length, sample) already there. Reports are rebuilt from the results alone.

Under ``torchrun --nproc-per-node N -m longlab.cli eval ...`` the cells (method, task, length) are
dealt round-robin to the N processes, each on its own GPU (``cuda:LOCAL_RANK``) or the CPU; they
append to the same ``results.jsonl`` under an exclusive file lock, wait for each other at a gloo
barrier, and rank 0 writes the report. Each row carries its cell's index, and reports order rows by
it, so the summary is the one a single process writes.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from longlab.bridge import apply, reset
from longlab.data.synthetic import Sample
from longlab.errors import LonglabError
from longlab.eval import memory
from longlab.eval.tasks import CellContext, HeldOut, Task, parse_task
from longlab.loading import load, resolve_device
from longlab.positions import RopeConfig
from longlab.spec import Composition, compose

DEFAULT_METHODS = (
    "none",
    "linear:factor=4",
    "ntk:factor=4",
    "yarn:factor=4",
    "selfextend:group=8,window=128",
    "rerope:window=256",
)
DEFAULT_TASKS = ("passkey", "niah", "ppl")


@dataclass
class EvalConfig:
    model: str = "tiny"
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    lengths: list[int] | None = None  # default: L, 2L, 4L of the model's training length
    samples: int | None = None  # default: each task's own
    seed: int = 0
    out: str = "runs/eval"
    chat: bool = False
    batch_size: int = 1
    allow_beyond_reach: bool = False
    device: str = "auto"  # cuda when a GPU is there, else cpu
    dtype: str | None = None  # float32 / bfloat16 / float16; default float32 on cpu, bfloat16 on cuda


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_length(text: str) -> int:
    """'512', '2k' (2048), '1.5k' (1536)."""
    value = text.strip().lower()
    try:
        length = int(float(value[:-1]) * 1024) if value.endswith("k") else int(value)
    except ValueError:
        raise LonglabError(f"a length must be a token count like 512 or 2k, got {text!r}") from None
    if length < 16:
        raise LonglabError(f"a length must be at least 16 tokens, got {text!r}")
    return length


# -- measurement helpers --------------------------------------------------------------------------


def _peak_memory_mb(device: torch.device) -> float | None:
    peak = memory.peak_bytes(device)
    return None if peak is None else peak / 2**20


def memory_estimate(model, length: int, batch: int = 1) -> int:
    """Bytes a forward pass over ``length`` tokens needs beyond the weights: the KV cache, a few
    hidden-state copies per layer, and one chunk of logits."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    size = next(model.parameters()).element_size()
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * size * length * batch
    activations = 12 * config.hidden_size * size * length * batch + 4 * config.intermediate_size * size * length
    logits = 4 * config.vocab_size * min(length, 1024) * batch
    return kv + activations + logits


class Results:
    """``results.jsonl``: append-only; knows which cells are done and in which dtypes they were measured."""

    def __init__(self, folder: Path):
        self.path = folder / "results.jsonl"
        self.done: set[tuple] = set()
        self.dtypes: set[str] = set()
        if self.path.exists():
            with self.path.open() as f:
                fcntl.flock(f, fcntl.LOCK_SH)  # another process may be appending a line right now
                text = f.read()
            for line in text.splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.done.add(self.key(row))
                    if "dtype" in row:  # rows written before dtypes were recorded carry none
                        self.dtypes.add(row["dtype"])

    @staticmethod
    def key(row: dict) -> tuple:
        return row["method"], row["task"], row["length"], row["sample"]

    def append(self, row: dict) -> None:
        with self.path.open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # other processes of a torchrun evaluation append too
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
            fcntl.flock(f, fcntl.LOCK_UN)
        self.done.add(self.key(row))


@dataclass(frozen=True)
class Ranks:
    """This process's share of a multi-process evaluation (torchrun's environment; 1 process without)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> Ranks:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    def device(self, device: torch.device) -> torch.device:
        """One GPU per process (``cuda:LOCAL_RANK``) when the device is cuda without an index."""
        if self.world > 1 and device.type == "cuda" and device.index is None:
            if self.local_rank >= torch.cuda.device_count():
                raise LonglabError(
                    f"process {self.rank} (LOCAL_RANK {self.local_rank}) needs cuda:{self.local_rank}, but this "
                    f"machine has {torch.cuda.device_count()} GPU(s); start at most that many processes per node"
                )
            return torch.device("cuda", self.local_rank)
        return device

    def start(self) -> bool:
        """Join the process group (gloo: only a barrier, whatever the device); True if this call made it."""
        import torch.distributed as dist

        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("gloo", timeout=datetime.timedelta(days=1))
            return True
        return False

    def wait_for_all(self, started: bool) -> None:
        """Wait until every process has written its cells; leave the group if :meth:`start` made it."""
        import torch.distributed as dist

        if self.world > 1:
            dist.barrier()
            if started:
                dist.destroy_process_group()


# -- the run --------------------------------------------------------------------------------------


def _check_before_work(model, methods: list[Composition], lengths: list[int], config: EvalConfig) -> None:
    """Fail on an impossible length before any work: beyond a method's designed reach, or more
    memory than the machine has."""
    from longlab.bridge.patch import rope_config

    rope: RopeConfig = rope_config(model)
    for spec in methods:
        position = spec.of_kind("position")
        reach = position.resolve(rope).reach() if position is not None else None
        too_long = [n for n in lengths if reach is not None and n > reach]
        if too_long and not config.allow_beyond_reach:
            raise LonglabError(
                f"method {str(spec)!r} is designed for inputs up to {reach} tokens (L_train = {rope.original_length}); "
                f"lengths {too_long} are beyond it. Raise its factor/group, drop those lengths, "
                "or pass --allow-beyond-reach to measure the breakdown"
            )
    need = memory_estimate(model, max(lengths), config.batch_size)
    available = memory.available_bytes(model.device)  # free GPU memory on CUDA, MemAvailable on the CPU
    if need > 0.9 * available:
        raise LonglabError(
            f"length {max(lengths)} needs about {need / 2**30:.1f} GiB beyond the weights; "
            f"{model.device} has {available / 2**30:.1f} GiB available"
        )


def run(config: EvalConfig) -> Path:
    """Run the matrix, appending to ``{out}/results.jsonl``, then write the report; returns ``out``."""
    from longlab.eval.report import write_report

    compositions = {str(c): c for c in map(compose, config.methods)}  # each spec parsed once, here
    methods = list(compositions)
    tasks: list[Task] = [parse_task(spec) for spec in config.tasks]
    ranks = Ranks.from_environment()
    device = ranks.device(resolve_device(config.device))  # a bad device fails before anything starts
    dtype_name = config.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if dtype_name not in DTYPES:
        raise LonglabError(f"dtype {dtype_name!r} is not supported; use one of {', '.join(DTYPES)}")
    out = Path(config.out)
    results = Results(out)
    earlier = results.dtypes - {dtype_name}
    if earlier:  # resuming in another precision would average two models' scores into one summary
        raise LonglabError(
            f"{out} holds results measured in {', '.join(sorted(earlier))}; resume with --dtype "
            f"{sorted(earlier)[0]} or write {dtype_name} results to another --out"
        )
    started = ranks.start()
    model, tokenizer = load(config.model, dtype=DTYPES[dtype_name], device=device)
    model.generation_config.max_length = None
    train_length = model.config.max_position_embeddings
    lengths = config.lengths or [train_length, 2 * train_length, 4 * train_length]
    _check_before_work(model, list(compositions.values()), lengths, config)

    out.mkdir(parents=True, exist_ok=True)
    with (out / "runs.jsonl").open("a") as f:  # every invocation's configuration, appended
        fcntl.flock(f, fcntl.LOCK_EX)
        record = {
            "rank": ranks.rank,
            "world": ranks.world,
            **config.__dict__,
            "device": str(device),
            "dtype": dtype_name,
            "lengths": lengths,
            "train_length": train_length,
            "started": time.time(),
        }
        f.write(json.dumps(record) + "\n")

    cells = []  # (method, task, subtask, length, count)
    for method in methods:
        for task in tasks:
            count = config.samples or task.default_samples
            for subtask in task.subtasks():
                cells += [(method, task, subtask, length, count) for length in lengths]
    held_out = HeldOut(tokenizer)

    prepared = _prepare_samples(cells, tokenizer, config.seed)  # every prompt is built before any work
    mine = [(index, cell) for index, cell in enumerate(cells) if index % ranks.world == ranks.rank]
    total = sum(task.cell_size(count) for _, (_, task, _, _, count) in mine)
    overall = tqdm(total=total, desc="eval" if ranks.world == 1 else f"eval rank {ranks.rank}", unit="sample")
    applied = None
    for index, (method, task, subtask, length, count) in mine:
        todo = [i for i in range(task.cell_size(count)) if (method, subtask, length, i) not in results.done]
        overall.update(task.cell_size(count) - len(todo))
        if not todo:
            continue
        if applied != method:
            apply(model, compositions[method])
            applied = method
        cell = tqdm(total=len(todo), desc=f"{method} | {subtask} | {length}", unit="sample", leave=False)
        context = CellContext(model, tokenizer, subtask, length, count, prepared.get((subtask, length)), config.chat,
                              config.batch_size, held_out)  # fmt: skip
        batches = task.measure(context, todo)
        while True:  # the task does the work of each batch; the runner times it and records its rows
            memory.reset_peak(device)
            began = time.perf_counter()
            done = next(batches, None)
            if done is None:
                break
            indices, rows = done
            cost = _cost(began, device, len(indices))  # measured once, before any row is written
            for i, row in zip(indices, rows, strict=True):
                results.append({
                    "method": method, "task": subtask, "length": length, "sample": i, "seed": config.seed,
                    "cell": index, "kind": task.kind, **row, **cost, "device": device.type, "dtype": dtype_name,
                })  # fmt: skip
            cell.update(len(indices))
            overall.update(len(indices))
        cell.close()
    overall.close()
    reset(model)
    ranks.wait_for_all(started)
    if ranks.rank == 0:
        write_report(out, train_length=train_length)
    return out


def _prepare_samples(cells, tokenizer, seed: int) -> dict[tuple[str, int], list[Sample]]:
    """Build every generation prompt up front, so a length a task cannot fit fails before any work."""
    prepared = {}
    for _, task, subtask, length, count in cells:
        if task.kind != "generation" or (subtask, length) in prepared:
            continue
        try:
            prepared[subtask, length] = task.samples(subtask, tokenizer, length, count, seed)
        except ValueError as error:
            raise LonglabError(f"task {subtask!r} at length {length}: {error}") from None
    return prepared


def _cost(began: float, device: torch.device, share: int) -> dict:
    """Latency per sample of a batch that began at ``began``, and the peak memory since its reset."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the latency of the work, not of its launch
    return {"latency_s": round((time.perf_counter() - began) / share, 4), "peak_memory_mb": _peak_memory_mb(device)}
