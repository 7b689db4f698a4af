"""Sequence parallelism: exact attention for a sequence split over processes (torch.distributed).

- :func:`ring_attention` / :func:`ulysses_attention`: drop-in attention for a sequence shard
  (q, k, v as (batch, heads, local_len, head_dim), unrotated, any longlab position method).
- :func:`ring_segmented_attention` / :func:`ulysses_segmented_attention`: the same with the kernel's
  own arguments (global positions, segments, table), for callers that already have them.
- :func:`shard`: a context manager that makes a patched model's attention sequence-parallel.
- :class:`SequenceLayout`: zigzag / contiguous split of a global sequence, padding, gather.
- :func:`stats` / :func:`reset_stats`: bytes sent and attention work, measured per process.
- :func:`distributed_backend`: the torch.distributed backend for a device (NCCL for CUDA, gloo for the CPU).

Run ``torchrun --nproc-per-node N -m longlab.parallel.demo`` for a long-sequence forward/backward on
the bundled model. See docs/parallel.md.
"""

from longlab.parallel.comm import distributed_backend
from longlab.parallel.layout import LAYOUTS, SequenceLayout
from longlab.parallel.ring import ring_attention, ring_segmented_attention
from longlab.parallel.shard import MODES, SequenceParallel, shard
from longlab.parallel.stats import Stats, count_pairs, reset_stats, stats
from longlab.parallel.ulysses import ulysses_attention, ulysses_segmented_attention

__all__ = [
    "LAYOUTS",
    "MODES",
    "SequenceLayout",
    "SequenceParallel",
    "Stats",
    "count_pairs",
    "distributed_backend",
    "reset_stats",
    "ring_attention",
    "ring_segmented_attention",
    "shard",
    "stats",
    "ulysses_attention",
    "ulysses_segmented_attention",
]
