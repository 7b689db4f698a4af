"""``xpos``: RoPE with an exponential decay that makes attention length-extrapolatable."""

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
class XPos(LabPosition):
    """xPos (Sun et al., 2023, "A Length-Extrapolatable Transformer", §3.2, eq. 10-11): RoPE where
    channel pair i of the query at n is also scaled by zeta_i^(n/B) and of the key at m by
    zeta_i^(-m/B), zeta_i = (2i/d + gamma) / (1 + gamma); q.k then decays as zeta_i^((n-m)/B).
    Paper defaults gamma = 0.4, B = 512."""

    name = "xpos"
    gamma: float = 0.4
    scale_base: float = 512.0
    base: float = 10000.0

    def __post_init__(self) -> None:
        check_range(self.name, "gamma", self.gamma, low=0.0, low_open=True)
        check_range(self.name, "scale_base", self.scale_base, low=0.0, low_open=True)
        check_range(self.name, "base", self.base, low=1.0, low_open=True)

    def build(self, shape: ModelShape) -> PositionModule:
        return XPosModule(FrequencyTable(base_inv_freq(shape.head_dim, self.base)), self.gamma, self.scale_base)


class XPosModule(PositionModule):
    def __init__(self, table: FrequencyTable, gamma: float, scale_base: float):
        super().__init__()
        self.table, self.gamma, self.scale_base = table, gamma, scale_base

    def rotate(self, x: torch.Tensor, positions: torch.Tensor, key: bool) -> torch.Tensor:
        half = x.shape[-1] // 2
        i = torch.arange(half, device=x.device, dtype=torch.float32)
        zeta = (2 * i / x.shape[-1] + self.gamma) / (1 + self.gamma)
        power = positions.float()[:, None] / self.scale_base * (-1.0 if key else 1.0)
        scale = (zeta**power).to(x.dtype).repeat(1, 2)  # (T, d): pair i is channels i and i + d/2
        return rotate_pairs(x, positions, self.table) * scale
