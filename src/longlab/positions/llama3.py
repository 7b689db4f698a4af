"""``llama3``: the frequency-dependent scaling Meta shipped with Llama 3.1."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longlab.method import MAX_SCALE, check_order, check_original_length, check_range, register
from longlab.positions.base import PositionMethod
from longlab.positions.rope import FrequencyTable, RopeConfig


@register
@dataclass(frozen=True)
class Llama3(PositionMethod):
    """Llama 3.1 RoPE scaling (Dubey et al., 2024, "The Llama 3 Herd of Models", section 3.3 and the
    reference code): with wavelength lambda = 2 pi / inv, keep lambda < L/high_freq_factor, divide by s
    when lambda > L/low_freq_factor, and blend in between with t = (L/lambda - low) / (high - low).
    """

    name = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_length: int | None = None

    def __post_init__(self) -> None:
        check_range(self.name, "factor", self.factor, low=0, low_open=True, high=MAX_SCALE)
        check_range(self.name, "low_freq_factor", self.low_freq_factor, low=0, low_open=True, high=MAX_SCALE)
        check_range(self.name, "high_freq_factor", self.high_freq_factor, low=0, low_open=True, high=MAX_SCALE)
        check_order(self.name, "low_freq_factor", self.low_freq_factor, "high_freq_factor", self.high_freq_factor, True)
        check_original_length(self)

    def table(self, rope: RopeConfig, seq_len: int) -> FrequencyTable:
        inv = rope.inv_freq()
        wavelength = 2 * math.pi / inv
        length = self.original_length
        t = (length / wavelength - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        blended = (1 - t) * inv / self.factor + t * inv
        scaled = torch.where(wavelength > length / self.low_freq_factor, inv / self.factor, blended)
        return FrequencyTable(torch.where(wavelength < length / self.high_freq_factor, inv, scaled))

    def reach(self) -> int:
        return int(self.factor * self.original_length)
