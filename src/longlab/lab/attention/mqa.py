"""``mqa``: multi-query attention, one K/V head shared by every query head."""

from __future__ import annotations

from dataclasses import dataclass

from longlab.lab.attention.base import AttentionModule, LabAttention
from longlab.lab.attention.gqa import GroupedAttention
from longlab.lab.positions.base import ModelShape
from longlab.lab.registry import register


@register
@dataclass(frozen=True)
class Mqa(LabAttention):
    """Multi-query attention (Shazeer, 2019, "Fast Transformer Decoding: One Write-Head is All You
    Need", §3): every query head attends with the same single key and value head, so the KV cache is
    heads times smaller. Equal to ``gqa:kv_heads=1`` (Ainslie et al., 2023, §2.2)."""

    name = "mqa"

    def build(self, shape: ModelShape, layer: int) -> AttentionModule:
        return GroupedAttention(kv_heads=1)
