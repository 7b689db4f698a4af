"""``sandwich``: the sinusoidal embedding's own inner product, used as a relative bias."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longlab.lab.positions.base import LabPosition, ModelShape, PositionModule, distance
from longlab.lab.registry import register
from longlab.method import check_range


@register
@dataclass(frozen=True)
class Sandwich(LabPosition):
    """Sandwich (Chi et al., 2023, "Dissecting Transformer Length Extrapolation via the Lens of
    Receptive Field Analysis", §5): keep only the position-position term of sinusoidal attention,
    p_i . p_j = sum_{k=1..d'/2} cos((i - j) / base^(2k/d')), shift it by -d'/2 (0 at distance 0) and
    divide head h's bias by 8h/H, ALiBi's slope compression. Parameter-free. ``dim`` is d'
    (default the model width, longlab's choice)."""

    name = "sandwich"
    dim: int | None = None
    base: float = 10000.0

    def __post_init__(self) -> None:
        check_range(self.name, "dim", self.dim, low=2, integer=True)
        check_range(self.name, "base", self.base, low=1.0, low_open=True)

    def build(self, shape: ModelShape) -> PositionModule:
        return SandwichModule(self.dim or shape.d_model, self.base, shape.heads)


class SandwichModule(PositionModule):
    has_bias = True

    def __init__(self, dim: int, base: float, heads: int):
        super().__init__()
        self.dim, self.base, self.heads = dim, base, heads

    def bias(self, params, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        k = torch.arange(1, self.dim // 2 + 1, device=q_pos.device, dtype=torch.float32)
        inv = self.base ** (-2 * k / self.dim)
        inner = torch.cos(distance(q_pos, k_pos).float()[..., None] * inv).sum(-1) - self.dim // 2
        compress = 8 * torch.arange(1, self.heads + 1, device=q_pos.device, dtype=torch.float32) / self.heads
        return inner[None] / compress[:, None, None]
