"""``rope``: rotary position embedding, trained from scratch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longlab.lab.positions.base import LabPosition, ModelShape, PositionModule
from longlab.lab.positions.rotary import rotate_pairs
from longlab.lab.registry import register
from longlab.method import check_range
from longlab.positions.rope import FrequencyTable, base_inv_freq


@register
@dataclass(frozen=True)
class Rope(LabPosition):
    """RoPE (Su et al., 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding", §3.4.2,
    eq. 34): channel pair i of q and k turns by p * base^(-2i/d), so q.k depends on i - j only."""

    name = "rope"
    base: float = 10000.0

    def __post_init__(self) -> None:
        check_range(self.name, "base", self.base, low=1.0, low_open=True)

    def build(self, shape: ModelShape) -> PositionModule:
        return RopeModule(FrequencyTable(base_inv_freq(shape.head_dim, self.base)))


class RopeModule(PositionModule):
    def __init__(self, table: FrequencyTable):
        super().__init__()
        self.table = table

    def rotate(self, x: torch.Tensor, positions: torch.Tensor, key: bool) -> torch.Tensor:
        return rotate_pairs(x, positions, self.table)
