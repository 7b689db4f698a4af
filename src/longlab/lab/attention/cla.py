"""``cla``: cross-layer attention, groups of adjacent layers sharing one layer's keys and values."""

from __future__ import annotations

from dataclasses import dataclass

from longlab.lab.attention.base import AttentionModule, LabAttention
from longlab.lab.attention.gqa import GroupedAttention, kv_heads_of
from longlab.lab.positions.base import ModelShape
from longlab.lab.registry import register
from longlab.method import check_range


@register
@dataclass(frozen=True)
class Cla(LabAttention):
    """Cross-Layer Attention (Brandon et al., 2024, "Reducing Transformer Key-Value Cache Size with
    Cross-Layer Attention", §2): layers form groups of ``share`` adjacent layers (the last group may be
    shorter); only a group's first layer projects keys and values, the others project queries only
    and attend with the first layer's K/V (keys rotated once, by the same positions). The KV cache
    shrinks by ``share`` (CLA2 is the paper's main setting, hence the default 2). ``kv_heads``
    combines it with fewer K/V heads (the paper pairs CLA with MQA and GQA); ``None``: one per
    query head."""

    name = "cla"
    share: int = 2
    kv_heads: int | None = None

    def __post_init__(self) -> None:
        check_range(self.name, "share", self.share, low=1, integer=True)
        check_range(self.name, "kv_heads", self.kv_heads, low=1, integer=True)

    def build(self, shape: ModelShape, layer: int) -> AttentionModule:
        kv_heads = shape.heads if self.kv_heads is None else kv_heads_of(self.name, self.kv_heads, shape)
        # share = 1 leaves every layer its own K/V: multi-head (or grouped) attention, no sharing
        source = layer - layer % self.share if self.share > 1 else None
        return GroupedAttention(kv_heads, kv_layer=source)
