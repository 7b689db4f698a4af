"""``longnet``: a mix of dilated attentions over segments, weighted by their softmax denominators."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longlab.errors import SpecError
from longlab.lab.attention.base import AttentionModule, LabAttention
from longlab.lab.attention.sparse import SparseAttention, query_positions
from longlab.lab.positions.base import ModelShape
from longlab.lab.registry import register
from longlab.method import check_range


def _whole(method: str, param: str, values: tuple[float, ...]) -> tuple[int, ...]:
    """Whole numbers >= 1 from a spec list (the spec grammar reads lists as floats)."""
    if not values:
        raise SpecError(f"{method}: parameter '{param}' must be a non-empty list like [32;128], got []")
    for value in values:
        check_range(method, param, value, low=1)
        if value != int(value):
            raise SpecError(f"{method}: parameter '{param}' must hold whole numbers >= 1, got {value}")
    return tuple(int(v) for v in values)


@register
@dataclass(frozen=True)
class LongNet(LabAttention):
    """LongNet's dilated attention (Ding et al., 2023, "LongNet: Scaling Transformers to 1,000,000,000
    Tokens", §2.2-2.3, eq. 5-9), causal. For each pair (w, r) of ``segments`` and ``dilations`` the
    sequence is cut into segments of w tokens and every r-th row of a segment is kept (eq. 5-6);
    attention runs inside each sparsified segment (eq. 7) and rows not kept get no output from that
    pair (eq. 8). The pairs' outputs are mixed with weights proportional to their softmax denominators
    (eq. 9), which is the softmax over all pairs' keys counted once per pair that selects them — how
    longlab computes it (one gather of every pair's keys, :mod:`~longlab.lab.attention.sparse`).
    Multi-head (§2.3): head h keeps the rows at offset h mod r in each segment. Each segment length
    must be a multiple of its dilation (the paper's geometric sequences are). A query no pair keeps
    (none with r = 1) outputs zero. Defaults: w = 32, 128, 512 with r = 1, 4, 16 (32 keys each)."""

    name = "longnet"
    segments: tuple[float, ...] = (32.0, 128.0, 512.0)
    dilations: tuple[float, ...] = (1.0, 4.0, 16.0)

    def __post_init__(self) -> None:
        segments = _whole(self.name, "segments", self.segments)
        dilations = _whole(self.name, "dilations", self.dilations)
        if len(segments) != len(dilations):
            raise SpecError(
                f"{self.name}: 'segments' and 'dilations' must have the same length (one (w, r) pair each), "
                f"got {len(segments)} and {len(dilations)}"
            )
        for w, r in zip(segments, dilations, strict=True):
            if w % r:
                raise SpecError(f"{self.name}: each segment must be a multiple of its dilation, got w={w}, r={r}")

    def build(self, shape: ModelShape, layer: int) -> AttentionModule:
        pairs = tuple((int(w), int(r)) for w, r in zip(self.segments, self.dilations, strict=True))
        return LongNetAttention(pairs, shape.heads)


class LongNetAttention(SparseAttention):
    block = 16

    def __init__(self, pairs: tuple[tuple[int, int], ...], heads: int):
        super().__init__()
        self.pairs, self.heads = pairs, heads

    def pattern(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = -(-length // self.block)
        i = query_positions(blocks, self.block, device)[None, :, :, None]  # (1, n, block, 1)
        head = torch.arange(self.heads, device=device).view(-1, 1, 1)
        indices, masks = [], []
        for w, r in self.pairs:
            w = min(w, blocks * self.block)  # one segment holds the whole sequence: same pattern
            offset = head % r  # (H, 1, 1)
            first = i[0, :, :1, 0][None] // w * w + offset  # (H, n, 1): the block's segment's first kept row
            slots = (w + self.block - 2) // r + 1  # kept rows from that segment's start to the block's end
            index = first + torch.arange(slots, device=device) * r  # (H, n, slots)
            j = index[:, :, None, :]
            kept = (i % w - offset[..., None]) % r == 0  # the query is one of this pair's rows
            masks.append(kept & (j // w == i // w) & (j <= i))
            indices.append(index)
        return torch.cat(indices, dim=2), torch.cat(masks, dim=3)
