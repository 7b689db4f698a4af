"""``kerple_log``: KERPLE's logarithmic kernel bias, learned per head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from longlab.lab.positions.base import LabPosition, ModelShape, PositionModule, distance
from longlab.lab.registry import register
from longlab.method import check_range

EPS = 1e-2  # KERPLE keeps r1, r2 >= eps by projection after each step (the paper's code)


@register
@dataclass(frozen=True)
class KerpleLog(LabPosition):
    """KERPLE, logarithmic variant (Chi et al., 2022, "KERPLE: Kernelized Relative Positional
    Embedding for Length Extrapolation", §4, eq. 7): score(i, j) += -r1_h log(1 + r2_h |i - j|),
    r1, r2 > 0 learned per head. ``r1``, ``r2`` are the initial values (0 for r1 = NoPE at start;
    projection to >= eps applies after each training step, not at build)."""

    name = "kerple_log"
    r1: float = 1.0
    r2: float = 1.0

    def __post_init__(self) -> None:
        check_range(self.name, "r1", self.r1, low=0.0)
        check_range(self.name, "r2", self.r2, low=0.0)

    def build(self, shape: ModelShape) -> PositionModule:
        return KerpleModule(shape.heads, self.r1, self.r2, log=True)


class KerpleModule(PositionModule):
    """Both KERPLE variants: log (-r1 log(1 + r2 d)) and power (-r1 d^r2, r2 <= 2)."""

    has_bias = True

    def __init__(self, heads: int, r1: float, r2: float, log: bool):
        super().__init__()
        self.log = log
        self.r1 = nn.Parameter(torch.full((heads, 1, 1), float(r1)))
        self.r2 = nn.Parameter(torch.full((heads, 1, 1), float(r2)))

    def bias_params(self) -> tuple[torch.Tensor, ...]:
        return (self.r1, self.r2)

    def bias(self, params, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        r1, r2 = params
        d = distance(q_pos, k_pos).to(r1.dtype)
        if self.log:
            return -r1 * torch.log1p(r2 * d)
        # d^r2 with d = 0 -> 0; pow on max(d, 1) keeps the gradient in r2 (d^r2 log d) finite at d = 0
        return -r1 * torch.where(d > 0, d.clamp(min=1).pow(r2), torch.zeros_like(d))

    @torch.no_grad()
    def project(self) -> None:
        self.r1.clamp_(min=EPS)
        self.r2.clamp_(min=EPS, max=None if self.log else 2.0)
