"""``power`` and ``truncation``: the two frequency edits of Giraffe."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longlab.method import check_order, check_original_length, check_range, register
from longlab.positions.base import PositionMethod
from longlab.positions.rope import FrequencyTable, RopeConfig


@register
@dataclass(frozen=True)
class Power(PositionMethod):
    """Giraffe power scaling (Pal et al., 2023, "Giraffe: Adventures in Expanding Context Lengths in
    LLMs", eq. 30 of the survey): inv_i * (1 - 2i/d)^p. High frequencies are nearly kept, low ones
    shrink towards 0. ``p = 0`` is plain RoPE. The default p = 0.5 is longlab's choice.
    """

    name = "power"
    power: float = 0.5

    def __post_init__(self) -> None:
        check_range(self.name, "power", self.power, low=0)

    def table(self, rope: RopeConfig, seq_len: int) -> FrequencyTable:
        fraction = torch.arange(0, rope.head_dim, 2, dtype=torch.int64).float() / rope.head_dim
        return FrequencyTable(rope.inv_freq() * (1 - fraction) ** self.power)


@register
@dataclass(frozen=True)
class Truncation(PositionMethod):
    """Giraffe basis truncation (Pal et al., 2023, eq. 32 of the survey): a frequency theta >= b is
    kept, a < theta < b becomes the constant rho, theta <= a becomes 0.

    Defaults (longlab's choice, stated in terms of the training length L): b = 2 pi / L keeps every
    dimension that completes a full turn within L; a = b / 8; rho = a.
    """

    name = "truncation"
    low: float | None = None
    high: float | None = None
    rho: float | None = None
    original_length: int | None = None

    def __post_init__(self) -> None:
        for param in ("low", "high"):
            check_range(self.name, param, getattr(self, param), low=0)
        # a frequency above pi radians per token aliases to a lower one; a huge one overflows the angles
        check_range(self.name, "rho", self.rho, low=0, high=math.pi)
        check_original_length(self)
        check_order(self.name, "low", self.low, "high", self.high, strict=False)

    def resolve(self, rope: RopeConfig) -> Truncation:
        resolved = super().resolve(rope)
        high = resolved.high if resolved.high is not None else 2 * math.pi / resolved.original_length
        low = resolved.low if resolved.low is not None else high / 8
        rho = resolved.rho if resolved.rho is not None else low
        return Truncation(low, high, rho, resolved.original_length)

    def table(self, rope: RopeConfig, seq_len: int) -> FrequencyTable:
        inv = rope.inv_freq()
        middle = torch.full_like(inv, self.rho)
        return FrequencyTable(torch.where(inv >= self.high, inv, torch.where(inv > self.low, middle, 0.0)))
