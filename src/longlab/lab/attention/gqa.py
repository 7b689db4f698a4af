"""``gqa``: grouped-query attention, fewer K/V heads than query heads (also the module MQA and CLA use)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longlab.errors import SpecError
from longlab.lab.attention.base import AttentionModule, LabAttention
from longlab.lab.positions.base import ModelShape
from longlab.lab.registry import register
from longlab.method import check_range


@register
@dataclass(frozen=True)
class Gqa(LabAttention):
    """Grouped-query attention (Ainslie et al., 2023, "GQA: Training Generalized Multi-Query
    Transformer Models from Multi-Head Checkpoints", §2.2): the layer projects ``kv_heads`` key and
    value heads; query heads are split into ``kv_heads`` groups of heads/kv_heads adjacent heads,
    and group g attends with K/V head g. Exact causal softmax otherwise, so ``kv_heads`` = heads is
    multi-head attention and 1 is MQA. The KV cache shrinks by heads/kv_heads. Default 2 (longlab's
    choice: half the tiny model's 4 heads)."""

    name = "gqa"
    kv_heads: int = 2

    def __post_init__(self) -> None:
        check_range(self.name, "kv_heads", self.kv_heads, low=1, integer=True)

    def build(self, shape: ModelShape, layer: int) -> AttentionModule:
        return GroupedAttention(kv_heads_of(self.name, self.kv_heads, shape))


def kv_heads_of(name: str, kv_heads: int, shape: ModelShape) -> int:
    """``kv_heads``, checked against the model's query heads (the groups must be whole)."""
    if shape.heads % kv_heads:
        raise SpecError(
            f"{name}: parameter 'kv_heads' must divide the model's {shape.heads} query heads, got {kv_heads}"
        )
    return kv_heads


class GroupedAttention(AttentionModule):
    """Causal softmax attention of q (B, H, T, d) over k, v (B, kv_heads, T, d): query head h reads
    K/V head h // (H / kv_heads). ``kv_layer`` (CLA): the layer whose K/V this layer uses."""

    def __init__(self, kv_heads: int, kv_layer: int | None = None):
        super().__init__()
        self.kv_heads, self.kv_layer = kv_heads, kv_layer

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # enable_gqa (torch >= 2.5; pyproject asks >= 2.11) groups adjacent query heads as GQA does,
        # without materialising the repeated K/V
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
