"""``t5``: a learned scalar bias per (log-spaced distance bucket, head)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from longlab.lab.positions.base import LabPosition, ModelShape, PositionModule, distance
from longlab.lab.registry import register
from longlab.method import check_order, check_range


def causal_bucket(dist: torch.Tensor, buckets: int, max_distance: int) -> torch.Tensor:
    """T5's unidirectional bucket of a distance i - j >= 0: exact below buckets/2, then logarithmic
    up to max_distance, and the last bucket beyond."""
    exact = buckets // 2
    far = (
        exact
        + (torch.log(dist.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (buckets - exact)).long()
    )
    return torch.where(dist < exact, dist, far.clamp(max=buckets - 1))


@register
@dataclass(frozen=True)
class T5Bias(LabPosition):
    """T5 relative position bias (Raffel et al., 2020, "Exploring the Limits of Transfer Learning with
    a Unified Text-to-Text Transformer", §2.1): score(i, j) += b[bucket(i - j), h], a learned scalar;
    buckets are exact for small distances and logarithmic up to ``max_distance`` (paper: 32 buckets,
    128). The table starts at zero (longlab's choice: the model starts as NoPE)."""

    name = "t5"
    buckets: int = 32
    max_distance: int = 128

    def __post_init__(self) -> None:
        check_range(self.name, "buckets", self.buckets, low=2, integer=True)
        check_range(self.name, "max_distance", self.max_distance, low=2, integer=True)
        check_order(self.name, "buckets // 2", self.buckets // 2, "max_distance", self.max_distance, strict=True)

    def build(self, shape: ModelShape) -> PositionModule:
        return T5Module(shape.heads, self.buckets, self.max_distance)


class T5Module(PositionModule):
    has_bias = True

    def __init__(self, heads: int, buckets: int, max_distance: int):
        super().__init__()
        self.buckets, self.max_distance = buckets, max_distance
        self.table = nn.Parameter(torch.zeros(heads, buckets))

    def bias_params(self) -> tuple[torch.Tensor, ...]:
        return (self.table,)

    def bias(self, params, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        (table,) = params
        return table[:, causal_bucket(distance(q_pos, k_pos), self.buckets, self.max_distance)]
