"""``sliding``: each query attends to the last ``window`` keys only (local attention)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longlab.attention.kernel import segmented_attention
from longlab.lab.attention.base import AttentionModule, LabAttention
from longlab.lab.positions.base import ModelShape
from longlab.lab.registry import register
from longlab.method import check_range
from longlab.positions.rope import FrequencyTable
from longlab.positions.segments import Segment


@register
@dataclass(frozen=True)
class Sliding(LabAttention):
    """Sliding-window attention (Beltagy et al., 2020, "Longformer: The Long-Document Transformer",
    §3.1; Child et al., 2019, §4.2 local attention): query i sees keys i - window < j <= i. Runs on
    longlab's segmented kernel with one segment [0, window) (docs/design.md), so cost and memory are
    O(T * window) and the gradient is the kernel's exact hand-written backward. Default window: 64
    (longlab's choice: half the lab's default training length)."""

    name = "sliding"
    window: int = 64

    def __post_init__(self) -> None:
        check_range(self.name, "window", self.window, low=1, integer=True)

    def build(self, shape: ModelShape, layer: int) -> AttentionModule:
        return SlidingAttention(self.window)


class SlidingAttention(AttentionModule):
    def __init__(self, window: int):
        super().__init__()
        self.window = window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # q and k arrive rotated by the position component: the kernel's own rotation is the identity
        still = FrequencyTable(torch.zeros(q.shape[-1] // 2, dtype=torch.float32, device=q.device))
        pos = positions[None]
        return segmented_attention(q, k, v, pos, pos, (Segment(0, self.window),), still, 1 / math.sqrt(q.shape[-1]))
