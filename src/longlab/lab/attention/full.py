"""``full``: exact causal softmax attention (the baseline every other attention is compared with)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longlab.lab.attention.base import AttentionModule, LabAttention
from longlab.lab.positions.base import ModelShape
from longlab.lab.registry import register


@register
@dataclass(frozen=True)
class Full(LabAttention):
    """Causal softmax attention (Vaswani et al., 2017, "Attention Is All You Need", §3.2.1, eq. 1)."""

    name = "full"
    takes_bias = True

    def build(self, shape: ModelShape, layer: int) -> AttentionModule:
        return FullAttention()


class FullAttention(AttentionModule):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
