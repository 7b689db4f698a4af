"""``memorizing``: the Memorizing Transformer, in-segment attention plus, in one layer, attention over
the top-k keys retrieved from a non-differentiable kNN memory of the earlier segments."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from longlab.cache.far import INDEXES, Index, TorchIndex
from longlab.errors import SpecError
from longlab.lab.attention.base import AttentionModule, LabAttention
from longlab.lab.attention.recurrence import in_segment_attention, split
from longlab.lab.positions.base import ModelShape
from longlab.lab.registry import register
from longlab.method import check_range


@register
@dataclass(frozen=True)
class Memorizing(LabAttention):
    """Memorizing Transformer (Wu et al., 2022, "Memorizing Transformers", ICLR, §3). Every layer
    attends causally within segments of ``segment`` tokens. Layer ``layer`` (negative counts from the
    top; default -2, the last but one: the paper puts its single kNN layer near the top of the stack,
    §3) also keeps an external memory of the (key, value) pairs of the last ``memory_tokens`` tokens
    of earlier segments (FIFO; detached: no gradient flows into it, §3.1); each query retrieves its
    ``top_k`` keys by exact inner product, attends to them with its own softmax, and mixes the result
    with the local one by a learned per-head gate g = sigmoid(b_g) (§3.2: V = V_m * g + V_c * (1 - g);
    b_g initialised at 0). A query with no memory yet (the first segment, or ``top_k = 0``) keeps its
    local output (longlab's choice). Search: faiss ``IndexFlatIP`` on the CPU, ``torch.topk`` on
    other devices (:data:`longlab.cache.far.INDEXES`); both exact, so they agree. Keys are stored as
    they arrive, rotated at their own positions (the paper adds no position bias to memories)."""

    name = "memorizing"
    segment: int = 32
    memory_tokens: int = 2048
    top_k: int = 32
    layer: int = -2

    def __post_init__(self) -> None:
        check_range(self.name, "segment", self.segment, low=1, integer=True)
        check_range(self.name, "memory_tokens", self.memory_tokens, low=1, integer=True)
        check_range(self.name, "top_k", self.top_k, low=0, integer=True)
        check_range(self.name, "layer", self.layer, integer=True)

    def build(self, shape: ModelShape, layer: int) -> AttentionModule:
        if not -shape.layers <= self.layer < shape.layers:
            raise SpecError(
                f"{self.name}: parameter 'layer' must be an integer >= {-shape.layers} and <= {shape.layers - 1} "
                f"for a model of {shape.layers} layers, got {self.layer!r}"
            )
        if layer != self.layer % shape.layers:
            return SegmentAttention(self.segment)
        return MemorizingAttention(self.segment, self.memory_tokens, self.top_k, shape.heads)


class SegmentAttention(AttentionModule):
    """The layers without memory: causal attention within each segment."""

    def __init__(self, segment: int):
        super().__init__()
        self.segment = segment

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return in_segment_attention(q, k, v, self.segment)


class MemorizingAttention(AttentionModule):
    def __init__(self, segment: int, memory_tokens: int, top_k: int, heads: int):
        super().__init__()
        self.segment, self.memory_tokens, self.top_k = segment, memory_tokens, top_k
        self.gate = nn.Parameter(torch.zeros(heads))  # b_g per head; sigmoid(0) = an even mix

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        local = in_segment_attention(q, k, v, self.segment)
        b, h, t, _ = q.shape
        if self.top_k == 0 or t <= self.segment:
            return local
        rows = lambda x: x.reshape(b * h, x.shape[2], x.shape[3])  # noqa: E731  (one search row per head)
        mq, mk, mv = rows(q), rows(k).detach(), rows(v).detach()  # the memory is not differentiable (§3.1)
        remembered = [local[:, :, : self.segment]]  # the first segment has no memory yet
        gate = torch.sigmoid(self.gate).to(q.dtype)[:, None, None]
        for a, z in split(t, self.segment)[1:]:
            start = max(0, a - self.memory_tokens)  # FIFO: the newest memory_tokens tokens before the segment
            found = knn_attention(mq[:, a:z], mk[:, start:a], mv[:, start:a], self.top_k)
            remembered.append(gate * found.reshape(b, h, z - a, -1) + (1 - gate) * local[:, :, a:z])
        return torch.cat(remembered, dim=2)


def knn_attention(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, top_k: int, index: type | None = None
) -> torch.Tensor:
    """Softmax attention of queries (R, S, d) over each one's ``top_k`` memory keys (R, M, d) by inner
    product, scaled by 1/sqrt(d) (§3.2); gradients reach the queries only (the selection is discrete)."""
    slots = nearest(queries, keys, min(top_k, keys.shape[1]), index)
    picked = slots.clamp(min=0)
    near_keys, near_values = _gather(keys, picked), _gather(values, picked)
    scores = (queries[:, :, None, :] * near_keys).sum(-1) / math.sqrt(queries.shape[-1])
    weights = torch.softmax(scores.masked_fill(slots < 0, -math.inf), dim=-1)
    return (weights[..., None] * near_values).sum(2)


def _gather(memory: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """memory (R, M, e) at slots (R, S, k) -> (R, S, k, e)."""
    rows = torch.arange(slots.shape[0], device=slots.device)[:, None, None]
    return memory[rows, slots]


def nearest(queries: torch.Tensor, keys: torch.Tensor, top_k: int, index: type | None = None) -> torch.Tensor:
    """Slots (R, S, top_k) of each query's top_k keys by exact inner product, best first; the index is
    :data:`longlab.cache.far.INDEXES` by device type (faiss on the CPU) unless ``index`` names one."""
    store: Index = (index or INDEXES.get(keys.device.type, TorchIndex))()
    store.add(keys.detach(), torch.ones(keys.shape[:2], dtype=torch.bool, device=keys.device), 0)
    return store.search(queries.detach(), top_k)
