"""``longlab finetune --ring N``: every training row split over N processes, attention by ring attention.

Each of the N processes (``torchrun --nproc-per-node N -m longlab.cli finetune --ring N ...``) builds the
same rows (they are a pure function of (seed, step)) and keeps its zigzag shard of every row
(longlab.parallel.shard); embeddings, MLPs and the head run on its own tokens, attention goes around the
ring (Liu et al., 2023), the loss is the exact global mean and the parameter gradients are summed over the
ranks, so every rank takes the single-process optimizer step on the single-process gradient and the
weights stay identical on all ranks. Rank 0 alone writes the log, the resumable state and the checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

import torch
import torch.distributed as dist

from longlab.errors import LonglabError
from longlab.eval.runner import Ranks
from longlab.method import check_range
from longlab.parallel import SequenceLayout, SequenceParallel, distributed_backend
from longlab.training.recipe import FinetuneRecipe

LAYOUT = "zigzag"  # every rank gets one early and one late chunk: the same causal work on each


def command(ring: int) -> str:
    """How to start a ring run of ``ring`` processes (what the errors tell the user)."""
    return f"torchrun --nproc-per-node {ring} -m longlab.cli finetune --ring {ring} ..."


def check_ring(ring: int | None, recipe: FinetuneRecipe) -> None:
    """Refuse before any work or message: N < 1, a recipe the ring cannot run, torchrun without --ring."""
    world = Ranks.from_environment().world
    if ring is None:
        if world > 1:
            raise LonglabError(
                f"finetune runs as {world} processes (WORLD_SIZE={world}) but without --ring: every process would "
                f"train the whole model alone; pass --ring {world} to split the training rows over them"
            )
        return
    check_range("finetune", "ring", ring, low=1, integer=True)
    if recipe.recipe == "longlora":
        raise LonglabError(
            "finetune: --ring does not compose with --recipe longlora: S2-Attn attends within groups of L/4 tokens "
            "that cut across the ring's shards; use --recipe full or pose with --ring"
        )


def check_row_length(ring: int, row_length: int) -> None:
    """The ring's zigzag layout cuts a row into 2N equal chunks; padding is refused (PoSE's positions
    have gaps, so a padded token would have no position that keeps it in every real query's future)."""
    pieces = SequenceLayout(LAYOUT, ring, row_length).pieces
    if row_length % pieces:
        raise LonglabError(
            f"finetune: --ring {ring} cuts every training row into {pieces} equal chunks (zigzag: 2 per rank), "
            f"but the rows are {row_length} tokens; use a length that is a multiple of {pieces}"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def process_group(ring: int, device: torch.device) -> Iterator[tuple[int, torch.device]]:
    """(this rank, its device) in a process group of ``ring`` processes: the one already initialized,
    torchrun's, or for ``--ring 1`` a group of this process alone (the same code path, measurable)."""
    created = False
    if not dist.is_initialized():
        ranks = Ranks.from_environment()
        if ranks.world != ring:
            raise LonglabError(
                f"finetune --ring {ring} runs as {ring} processes, but this is one of {ranks.world}: start it "
                f"with {command(ring)}"
            )
        device = ranks.device(device)  # one GPU per rank: cuda:LOCAL_RANK
        if device.type == "cuda":
            torch.cuda.set_device(device)  # before NCCL starts: each rank's communicator on its own GPU
        backend = distributed_backend(device)
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        created = True
    try:
        if dist.get_world_size() != ring:
            raise LonglabError(
                f"finetune --ring {ring} needs a process group of {ring} processes, got {dist.get_world_size()}"
            )
        yield dist.get_rank(), device
    finally:
        if created:
            dist.destroy_process_group()


def ring_loss(model: torch.nn.Module, sp: SequenceParallel, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The global next-token loss of the (B, L) rows ``ids`` at ``positions``, from this rank's shard;
    backward gives this rank's share of the gradient (sum them with ``sp.all_reduce_gradients``)."""
    local_ids, local_positions = sp.split(ids, positions)
    labels = sp.labels(ids)  # shifted on the whole row: a shard's last label lives on another rank
    logits = model(input_ids=local_ids, position_ids=local_positions, use_cache=False).logits
    return sp.loss(logits, labels)
