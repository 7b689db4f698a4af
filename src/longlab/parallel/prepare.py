"""Turn the user-level arguments of ``ring_attention``/``ulysses_attention`` into what the kernel takes.

A shard knows its global positions from the layout and its rank, and the frequency table comes from
the *global* real length (dynamic methods depend on it), never from the shard's own length.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from longlab.errors import LonglabError
from longlab.method import Method
from longlab.parallel.comm import Group
from longlab.parallel.layout import SequenceLayout, layout_for_shard
from longlab.positions import FrequencyTable, RopeConfig
from longlab.positions.rope import base_inv_freq
from longlab.positions.segments import Segment
from longlab.spec import compose

DEFAULT_BASE = 10000.0
DEFAULT_ORIGINAL_LENGTH = 4096


def default_rope(head_dim: int) -> RopeConfig:
    """Plain RoPE (base 10000) with L_train = 4096, used when no ``rope`` is given."""
    return RopeConfig(head_dim, DEFAULT_BASE, DEFAULT_ORIGINAL_LENGTH, base_inv_freq(head_dim, DEFAULT_BASE))


@dataclass(frozen=True)
class ShardCall:
    """Everything a sequence-parallel kernel call needs besides q, k, v."""

    comm: Group
    layout: SequenceLayout
    positions: torch.Tensor  # (B, T) global positions of the shard
    segments: tuple[Segment, ...]
    table: FrequencyTable
    scale: float
    query_scale: torch.Tensor | None  # (B, T) multiplier of q from a scaling method (logn), or None

    def scaled(self, q: torch.Tensor) -> torch.Tensor:
        """q multiplied by the scaling method's factor at each global position (q itself without one)."""
        return q if self.query_scale is None else q * self.query_scale[:, None, :, None].to(q.dtype)


def prepare(
    q: torch.Tensor,
    group: Any,
    layout: str,
    position: str | Method,
    rope: RopeConfig | None,
    scale: float | None,
    causal: bool,
    length: int | None,
) -> ShardCall:
    if not causal:
        raise LonglabError(
            "longlab's kernel is causal by position (a query sees keys at positions <= its own); "
            "non-causal sequence-parallel attention is not supported"
        )
    if q.dim() != 4:
        raise LonglabError(f"q must be (batch, heads, local_len, head_dim), got shape {tuple(q.shape)}")
    comm = Group.resolve(group)
    shard_layout = layout_for_shard(layout, comm.world, q.shape[2], length)
    batch, head_dim = q.shape[0], q.shape[-1]
    # The methods' formulas run on the host, on small tensors (as Patch.table does); only the table's
    # frequencies go to q's device, once per call rather than at every rotation.
    with torch.device("cpu"):
        if rope is None:
            rope = default_rope(head_dim)
        else:  # RoPE constants read from a model on a GPU: the formulas want them on the host too
            rope = dataclasses.replace(rope, native_inv_freq=rope.native_inv_freq.cpu())
        if rope.head_dim != head_dim:
            raise LonglabError(f"rope.head_dim is {rope.head_dim} but q has head_dim {head_dim}")
        methods = compose(position).resolve(rope)
        if methods.cache is not None:
            raise LonglabError(f"{methods.cache.name!r} is a cache method; sequence-parallel attention takes none")
        method = methods.position.resolve(rope)
        # The single-process table is built for max position + 1 = the real global length.
        table = method.table(rope, shard_layout.length)
    positions = shard_layout.positions(comm.rank).to(q.device).expand(batch, -1)
    scaling = methods.scaling
    return ShardCall(
        comm=comm,
        layout=shard_layout,
        positions=positions,
        segments=tuple(method.segments()),
        table=dataclasses.replace(table, inv_freq=table.inv_freq.to(q.device)),
        scale=1.0 / math.sqrt(head_dim) if scale is None else float(scale),
        query_scale=scaling.query_scale(positions) if scaling is not None else None,
    )
