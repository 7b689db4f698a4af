"""``logn``: log-length scaling of queries, a modifier that composes with any position method."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longlab.method import check_original_length, register
from longlab.positions.base import ScalingMethod


@register
@dataclass(frozen=True)
class LogN(ScalingMethod):
    """LogN attention scaling (Chiang & Cholak, 2022, "Overcoming a Theoretical Limitation of
    Self-Attention", section 5; used by Qwen): q at position p is multiplied by
    max(1, log(p + 1) / log(L)), keeping attention entropy steady past the training length L.
    """

    name = "logn"
    original_length: int | None = None

    def __post_init__(self) -> None:
        check_original_length(self, low=2)  # the scale divides by log L

    def query_scale(self, positions: torch.Tensor) -> torch.Tensor:
        scale = torch.log(positions.float() + 1) / math.log(self.original_length)
        return scale.clamp(min=1.0)
