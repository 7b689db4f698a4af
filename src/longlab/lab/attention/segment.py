"""``segment``: causal attention inside fixed segments only, nothing carried across (the vanilla
segment-level model Transformer-XL is compared with)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longlab.lab.attention.base import AttentionModule, LabAttention
from longlab.lab.attention.recurrence import segment_attention
from longlab.lab.positions.base import ModelShape
from longlab.lab.registry import register
from longlab.method import check_range


@register
@dataclass(frozen=True)
class Segment(LabAttention):
    """Fixed-segment attention (Al-Rfou et al., 2019, "Character-Level Language Modeling with Deeper
    Self-Attention", §2; the "vanilla model" of Dai et al., 2019, "Transformer-XL", §3.1): the sequence
    is cut into segments of ``segment`` tokens and each query attends causally within its own segment;
    no information crosses a segment boundary. Span and state per layer: at most ``segment`` keys/values.
    Default 32 tokens: a quarter of the lab's 128-token training length (the memory family's choice)."""

    name = "segment"
    segment: int = 32

    def __post_init__(self) -> None:
        check_range(self.name, "segment", self.segment, low=1, integer=True)

    def build(self, shape: ModelShape, layer: int) -> AttentionModule:
        return SegmentAttention(self.segment)


class SegmentAttention(AttentionModule):
    def __init__(self, segment: int):
        super().__init__()
        self.segment = segment

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return segment_attention(q, k, v, self.segment, memory=0)
