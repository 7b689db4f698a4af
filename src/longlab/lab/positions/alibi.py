"""``alibi``: a linear distance penalty on attention scores, one slope per head."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longlab.lab.positions.base import LabPosition, ModelShape, PositionModule, distance
from longlab.lab.registry import register
from longlab.method import check_range


def alibi_slopes(heads: int) -> list[float]:
    """The paper's geometric slopes 2^(-8h/H), h = 1..H; for H not a power of two, the slopes of the
    nearest lower power of two followed by every other slope of the next one (Press et al., 2022, §3)."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (h + 1) for h in range(n)]

    lower = 2 ** math.floor(math.log2(heads))
    if lower == heads:
        return power_of_two(heads)
    return power_of_two(lower) + power_of_two(2 * lower)[0::2][: heads - lower]


@register
@dataclass(frozen=True)
class ALiBi(LabPosition):
    """ALiBi (Press et al., 2022, "Train Short, Test Long: Attention with Linear Biases Enables Input
    Length Extrapolation", §3): score(i, j) += -m_h (i - j), slopes m_h = 2^(-8h/H); no position
    embedding. ``scale`` multiplies every slope (1 = the paper; 0 = NoPE)."""

    name = "alibi"
    scale: float = 1.0

    def __post_init__(self) -> None:
        check_range(self.name, "scale", self.scale, low=0.0)

    def build(self, shape: ModelShape) -> PositionModule:
        return ALiBiModule([self.scale * m for m in alibi_slopes(shape.heads)])


class ALiBiModule(PositionModule):
    has_bias = True

    def __init__(self, slopes: list[float]):
        super().__init__()
        self.slopes = slopes

    def bias(self, params, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        slopes = torch.tensor(self.slopes, dtype=torch.float32, device=q_pos.device)[:, None, None]
        return -slopes * distance(q_pos, k_pos).float()
