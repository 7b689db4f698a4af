"""The evaluation runner: methods x tasks x lengths x samples, one JSON line per sample.

Results are appended to ``results.jsonl`` as each sample finishes (flushed and synced), so an
interrupted run loses at most the sample in flight. Every row carries the fingerprint of what
produced it (model, tokenizer, dtype, seed, chat template, longlab version, method, task with its
parameters, length; see :mod:`longlab.eval.results`): rerunning with the same ``--out`` skips every
sample whose fingerprint is there, and a folder holding another configuration is refused. One
``longlab eval`` holds a folder at a time (``.longlab.lock``). Reports are rebuilt from the results alone.

Under ``torchrun --nproc-per-node N -m longlab.cli eval ...`` the cells (method, task, length) are
dealt round-robin to the N processes, each on its own GPU (``cuda:LOCAL_RANK``) or the CPU; rank 0
holds the folder's lock for all of them; they append to the same ``results.jsonl`` under an
exclusive file lock, wait for each other at a gloo barrier, and rank 0 writes the report. Each row
carries its cell's index, and reports order rows by it, so the summary is the one a single process
writes.
"""

from __future__ import annotations

import contextlib
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
from longlab.eval.results import FolderLock, Identity, Results, prepare_folder, repair
from longlab.eval.tasks import CellContext, HeldOut, Task, parse_task
from longlab.generation import chat_overhead, check_chat_template
from longlab.loading import checkpoint, load, resolve_device
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


def parse_lengths(text: str) -> list[int]:
    """'512,1k,2k' -> [512, 1024, 2048]; an empty list or item is an error."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or not all(items):
        raise LonglabError(f"--lengths must be comma-separated token counts like 512,1k,2k, got {text!r}")
    return [parse_length(item) for item in items]


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

    def agree(self, ok: bool) -> bool:
        """True on every process when ``ok`` is true on every process (one process: ``ok``)."""
        import torch.distributed as dist

        if self.world == 1 or not dist.is_initialized():
            return ok
        flag = torch.tensor([1 if ok else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

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
        context = spec.context  # a context method makes the model read less than the input: chunks, a summary
        read = {n: context.read_length(n) if context is not None else n for n in lengths}
        too_long = [n for n in lengths if reach is not None and read[n] > reach]
        if too_long and not config.allow_beyond_reach:
            reads = "" if context is None else f" (the model reads up to {max(read[n] for n in too_long)} of them)"
            raise LonglabError(
                f"method {str(spec)!r} is designed for inputs up to {reach} tokens (L_train = {rope.original_length}); "
                f"lengths {too_long} are beyond it{reads}. Raise its factor/group, drop those lengths, "
                "or pass --allow-beyond-reach to measure the breakdown"
            )
    need = memory_estimate(model, max(lengths), config.batch_size)
    available = memory.available_bytes(model.device)  # free GPU memory on CUDA, MemAvailable on the CPU
    if need > 0.9 * available:
        raise LonglabError(
            f"length {max(lengths)} needs about {need / 2**30:.1f} GiB beyond the weights; "
            f"{model.device} has {available / 2**30:.1f} GiB available"
        )


def _validate(config: EvalConfig) -> None:
    """Numbers the command line takes as given: each a clear error, before anything starts."""
    if config.samples is not None and config.samples < 1:
        raise LonglabError(f"--samples must be a positive number of samples per cell, got {config.samples}")
    if config.batch_size < 1:
        raise LonglabError(f"--batch-size must be a positive number of samples per generate() call, "
                           f"got {config.batch_size}")  # fmt: skip
    if config.lengths is not None and not config.lengths:
        raise LonglabError("--lengths names no length; give token counts like 512,1k,2k")
    if not config.methods:
        raise LonglabError("no method to run; give at least one --method (e.g. --method none)")
    if not config.tasks:
        raise LonglabError("no task to run; give at least one --task (e.g. --task passkey)")


def _tasks(specs: list[str]) -> list[Task]:
    """Parsed tasks, each spec once (the same task given twice with the same parameters runs once)."""
    return list({task.spec(): task for task in map(parse_task, specs)}.values())


@dataclass(frozen=True)
class Cell:
    """One (method, task, length) cell: its subtask as the task names it, its label in the results
    (``passkey[digits=7]``, ``ruler/vt``) and its fingerprint."""

    method: str
    task: Task
    subtask: str
    label: str
    length: int
    count: int
    fingerprint: str


def run(config: EvalConfig) -> Path:
    """Run the matrix, appending to ``{out}/results.jsonl``, then write the report; returns ``out``."""
    _validate(config)
    compositions = {str(c): c for c in map(compose, config.methods)}  # each spec parsed once, here
    methods = list(compositions)
    tasks = _tasks(config.tasks)
    lengths = list(dict.fromkeys(config.lengths)) if config.lengths else None
    ranks = Ranks.from_environment()
    device = ranks.device(resolve_device(config.device))  # a bad device fails before anything starts
    dtype_name = config.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if dtype_name not in DTYPES:
        raise LonglabError(f"dtype {dtype_name!r} is not supported; use one of {', '.join(DTYPES)}")
    folder = checkpoint(config.model)  # a missing model, weights or tokenizer fails here, before any work
    if config.chat:  # before the model is read
        from transformers import AutoTokenizer

        check_chat_template(AutoTokenizer.from_pretrained(folder))
    identity = Identity.of(config.model, folder, dtype_name, config.seed, config.chat)
    out = prepare_folder(config.out)
    started = ranks.start()
    with contextlib.ExitStack() as stack:
        error = None
        if ranks.rank == 0:  # one lock for all the processes of a torchrun evaluation
            try:
                stack.enter_context(FolderLock(out))
                repair(out)
            except LonglabError as failed:
                error = failed
        if not ranks.agree(error is None):
            raise error or LonglabError(f"rank 0 could not take the lock of {out}")
        results = Results(out, identity, quiet=ranks.rank != 0)
        train_length = _run(config, compositions, methods, tasks, lengths, ranks, device, dtype_name, out, results)
        ranks.wait_for_all(started)
        if ranks.rank == 0:
            from longlab.eval.report import write_report

            write_report(out, train_length=train_length)
    return out


def _run(config, compositions, methods, tasks, lengths, ranks, device, dtype_name, out, results) -> int:
    """The work under the folder's lock: load, check, prepare every prompt, measure; returns L_train."""
    model, tokenizer = load(config.model, dtype=DTYPES[dtype_name], device=device)
    if config.chat:
        check_chat_template(tokenizer)
    model.generation_config.max_length = None
    train_length = model.config.max_position_embeddings
    lengths = lengths or [train_length, 2 * train_length, 4 * train_length]
    _check_before_work(model, list(compositions.values()), lengths, config)

    with (out / "runs.jsonl").open("a") as f:  # every invocation's configuration, appended
        fcntl.flock(f, fcntl.LOCK_EX)
        record = {
            "rank": ranks.rank,
            "world": ranks.world,
            **config.__dict__,
            "tasks": [task.spec() for task in tasks],
            "device": str(device),
            "dtype": dtype_name,
            "lengths": lengths,
            "train_length": train_length,
            **{f"identity_{k}": v for k, v in results.identity.fields().items()},
            "started": time.time(),
        }
        f.write(json.dumps(record) + "\n")

    cells: dict[tuple, Cell] = {}  # one cell per (method, label, length), however often a task is named
    for method in methods:
        for task in tasks:
            count = config.samples or task.default_samples
            for subtask in task.subtasks():
                for length in lengths:
                    fingerprint = results.fingerprint(method, task.identity() + subtask[len(task.name) :], length)
                    cell = Cell(method, task, subtask, task.labelled(subtask), length, count, fingerprint)
                    results.check_cell(method, cell.label, length, fingerprint)
                    same = cells.setdefault((method, cell.label, length), cell)
                    if same.fingerprint != fingerprint:
                        raise LonglabError(
                            f"tasks {same.task.spec()!r} and {task.spec()!r} would both report as {cell.label!r}; "
                            "rename one file or run them into different --out folders"
                        )
    held_out = HeldOut(tokenizer)

    # every prompt is built before any work
    prepared = _prepare_samples(list(cells.values()), tokenizer, config.seed, config.chat, show=ranks.rank == 0)
    _check_context_cells(list(cells.values()), compositions, prepared)
    mine = [(index, cell) for index, cell in enumerate(cells.values()) if index % ranks.world == ranks.rank]
    total = sum(cell.task.cell_size(cell.count) for _, cell in mine)
    overall = tqdm(total=total, desc="eval" if ranks.world == 1 else f"eval rank {ranks.rank}", unit="sample")
    applied = None
    for index, cell in mine:
        size = cell.task.cell_size(cell.count)
        todo = [i for i in range(size) if not results.is_done(cell.fingerprint, i)]
        overall.update(size - len(todo))
        if not todo:
            continue
        if applied != cell.method:
            apply(model, compositions[cell.method])
            applied = cell.method
        bar = tqdm(total=len(todo), desc=f"{cell.method} | {cell.label} | {cell.length}", unit="sample", leave=False)
        context = CellContext(model, tokenizer, cell.subtask, cell.length, cell.count,
                              prepared.get((cell.label, cell.length)), config.chat, config.batch_size, held_out,
                              seed=config.seed, context=compositions[cell.method].context)  # fmt: skip
        batches = cell.task.measure(context, todo)
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
                    "method": cell.method, "task": cell.label, "length": cell.length, "sample": i,
                    "seed": config.seed, "cell": index, "kind": cell.task.kind, **row, **cost,
                    "device": device.type, "dtype": dtype_name, "task_spec": cell.task.spec(),
                    "fingerprint": cell.fingerprint,
                    **{k: v for k, v in results.identity.fields().items() if k not in ("dtype", "seed")},
                })  # fmt: skip
            bar.update(len(indices))
            overall.update(len(indices))
        bar.close()
    overall.close()
    reset(model)
    return train_length


def _prepare_samples(
    cells: list[Cell], tokenizer, seed: int, chat: bool = False, show: bool = True
) -> dict[tuple[str, int], list[Sample]]:
    """Build every generation prompt up front, so a length a task cannot fit fails before any work;
    a progress bar shows it (long RULER runs spend a minute here). With ``chat`` the prompts of tasks
    that use the chat template are built shorter by the template's own tokens, so the wrapped prompt
    still fits the length."""
    prepared = {}
    overhead = chat_overhead(tokenizer) if chat else 0
    wanted = list(dict.fromkeys((c.label, c.length) for c in cells if c.task.kind == "generation"))
    by_key = {(c.label, c.length): c for c in cells}
    for key in tqdm(wanted, desc="preparing prompts", unit="cell", disable=not show or not wanted):
        cell = by_key[key]
        try:
            room = cell.length - (overhead if cell.task.uses_chat(cell.subtask) else 0)
            prepared[key] = cell.task.samples(cell.subtask, tokenizer, room, cell.count, seed)
        except ValueError as error:
            raise LonglabError(f"task {cell.label!r} at length {cell.length}: {error}") from None
    return prepared


def _check_context_cells(cells: list[Cell], compositions: dict[str, Composition], prepared: dict) -> None:
    """Before any work: a context method runs on generation tasks whose every prompt splits into
    instruction, context and question."""
    for cell in cells:
        if compositions[cell.method].context is None:
            continue
        if cell.task.kind != "generation":
            raise LonglabError(
                f"method {cell.method!r} changes the input, and task {cell.label!r} scores a text's "
                "perplexity rather than answering a prompt; run context methods on generation tasks"
            )
        for sample in prepared[cell.label, cell.length]:
            cell.task.query(cell.subtask, sample)


def _cost(began: float, device: torch.device, share: int) -> dict:
    """Latency per sample of a batch that began at ``began``, and the peak memory since its reset."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the latency of the work, not of its launch
    return {"latency_s": round((time.perf_counter() - began) / share, 4), "peak_memory_mb": _peak_memory_mb(device)}
