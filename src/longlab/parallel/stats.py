"""Measured cost of sequence-parallel attention: bytes each rank sends and attention work it computes.

Counters live in one per-process :class:`Stats` object (:func:`stats`), updated by the ring, the
all-to-all and the position exchanges as they run, so balance and volume are measured from what the
implementation did, never estimated afterwards.

Definitions
-----------
- **bytes sent**: the payload this rank hands to other ranks, by kind (``kv``: key/value blocks of the
  ring, ``dkv``: their gradient accumulators on the way back, ``all_to_all``: Ulysses' exchanges,
  ``meta``: positions, padding masks and shape checks). For a collective it is the part of the
  rank's contribution that leaves the rank (an all-gather of ``x`` counts ``(N - 1) * x``), whatever
  algorithm the backend uses underneath.
- **score evaluations** (``forward_pairs``): (batch row x query head x query x key) pairs the kernel
  actually computes, read from the planner's layout: a full or masked run counts its whole rectangle
  (a masked run still computes every score), a causal square of side ``n`` counts ``n (n + 1) / 2``,
  skipped tiles count nothing, and a pair computed by two segments counts twice.
- **FLOPs**: ``4 d`` per forward score evaluation (``q.k`` and ``p v``, 2 FLOPs per multiply-add) and
  ``10 d`` per backward one (scores recomputed, ``dP = dO v``, ``dV``, ``dQ``, ``dK``).
- **kernel CPU seconds** (``forward_cpu_s``, ``backward_cpu_s``): CPU time of the calling thread inside
  the kernel calls (``time.thread_time``), so time spent waiting for a message or for a core shared
  with other ranks is not counted: on an oversubscribed machine it still shows each rank's own work.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from longlab.attention.plan import CAUSAL, FULL, MASK, Layout, classify
from longlab.positions.segments import Segment

FORWARD_FLOPS_PER_PAIR = 4  # times head_dim
BACKWARD_FLOPS_PER_PAIR = 10  # times head_dim


@dataclass
class Stats:
    """Counters of one process since the last :meth:`reset`."""

    bytes_sent: Counter = field(default_factory=Counter)
    forward_pairs: int = 0
    backward_pairs: int = 0
    forward_flops: int = 0
    backward_flops: int = 0
    forward_cpu_s: float = 0.0
    backward_cpu_s: float = 0.0
    calls: int = 0  # sequence-parallel attention forward calls

    def reset(self) -> None:
        self.bytes_sent.clear()
        self.forward_pairs = self.backward_pairs = self.forward_flops = self.backward_flops = self.calls = 0
        self.forward_cpu_s = self.backward_cpu_s = 0.0

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_sent.values())

    def add_bytes(self, kind: str, count: int) -> None:
        self.bytes_sent[kind] += int(count)

    def add_forward(self, pairs: int, head_dim: int) -> None:
        self.forward_pairs += pairs
        self.forward_flops += FORWARD_FLOPS_PER_PAIR * head_dim * pairs

    def add_backward(self, pairs: int, head_dim: int) -> None:
        self.backward_pairs += pairs
        self.backward_flops += BACKWARD_FLOPS_PER_PAIR * head_dim * pairs

    def as_dict(self) -> dict[str, int | dict[str, int]]:
        return {
            "bytes_sent": dict(self.bytes_sent),
            "total_bytes": self.total_bytes,
            "forward_pairs": self.forward_pairs,
            "backward_pairs": self.backward_pairs,
            "forward_flops": self.forward_flops,
            "backward_flops": self.backward_flops,
            "forward_cpu_s": self.forward_cpu_s,
            "backward_cpu_s": self.backward_cpu_s,
            "calls": self.calls,
        }


_STATS = Stats()


def stats() -> Stats:
    """This process's counters (live object; read it after the work, :func:`reset_stats` before)."""
    return _STATS


def reset_stats() -> None:
    _STATS.reset()


def count_pairs(layout: Layout, segments: Sequence[Segment]) -> int:
    """Query-key pairs one (batch row, head) of a kernel call with this layout computes (see module doc)."""
    # host-side, like the plan's modes it is combined with (attention/plan.py): bookkeeping, no data
    heights = torch.tensor(
        [b - a for a, b in (layout.block(i) for i in range(layout.n_blocks))], dtype=torch.int64, device="cpu"
    )
    widths = torch.tensor(
        [b - a for a, b in (layout.tile(j) for j in range(layout.n_tiles))], dtype=torch.int64, device="cpu"
    )
    total = 0
    for segment in segments:
        modes = classify(layout, segment)
        rect = (modes == FULL) | (modes == MASK)
        total += int((heights[:, None] * widths[None, :])[rect].sum())
        # A causal square is a block on its own diagonal tile: height == width == n.
        square = heights[:, None].expand_as(modes)[modes == CAUSAL]
        total += int((square * (square + 1) // 2).sum())
    return total
