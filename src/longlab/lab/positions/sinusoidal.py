"""``sinusoidal``: the fixed absolute embedding of the original transformer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longlab.lab.positions.base import LabPosition, ModelShape, PositionModule
from longlab.lab.registry import register
from longlab.method import check_range


@register
@dataclass(frozen=True)
class Sinusoidal(LabPosition):
    """Sinusoidal absolute embedding (Vaswani et al., 2017, "Attention Is All You Need", §3.5):
    PE(p, 2i) = sin(p / base^(2i/d)), PE(p, 2i+1) = cos(p / base^(2i/d)), added to the token
    embeddings."""

    name = "sinusoidal"
    base: float = 10000.0

    def __post_init__(self) -> None:
        check_range(self.name, "base", self.base, low=1.0, low_open=True)

    def build(self, shape: ModelShape) -> PositionModule:
        return SinusoidalModule(shape.d_model, self.base)


class SinusoidalModule(PositionModule):
    def __init__(self, d_model: int, base: float):
        super().__init__()
        self.d_model, self.base = d_model, base

    def absolute(self, positions: torch.Tensor) -> torch.Tensor:
        i = torch.arange(0, self.d_model, 2, device=positions.device, dtype=torch.float32)
        angles = positions.float()[:, None] / self.base ** (i / self.d_model)
        # interleave: even channels sin, odd channels cos
        return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)[:, : self.d_model]
