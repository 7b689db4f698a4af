"""``yarn`` and ``dynamic_yarn``: NTK-by-parts interpolation with attention temperature."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longlab.method import MAX_ATTENTION_FACTOR, MAX_SCALE, check_original_length, check_range, register
from longlab.positions.base import PositionMethod
from longlab.positions.rope import FrequencyTable, RopeConfig


def yarn_ramp(rope: RopeConfig, original_length: int, beta_fast: float, beta_slow: float) -> torch.Tensor:
    """ramp_j in [0, 1] over frequency index j: 0 keeps a dimension, 1 interpolates it fully.

    dim(r) = d ln(L / (2 pi r)) / (2 ln b); low = floor(dim(beta_fast)), high = ceil(dim(beta_slow)),
    both clamped to [0, d-1]; ramp_j = clip((j - low) / (high - low), 0, 1).
    """
    d, base = rope.head_dim, rope.base

    def dim(rotations: float) -> float:
        return d * math.log(original_length / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(dim(beta_fast)), 0)
    high = min(math.ceil(dim(beta_slow)), d - 1)
    if low == high:
        high += 0.001  # a single-step ramp, as in the reference implementation
    return ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)


def yarn_table(rope: RopeConfig, factor: float, original_length: int, beta_fast: float, beta_slow: float,
               attention_factor: float | None) -> FrequencyTable:  # fmt: skip
    inv = rope.inv_freq()
    ramp = yarn_ramp(rope, original_length, beta_fast, beta_slow)
    scaled = inv / factor * ramp + inv * (1 - ramp)
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return FrequencyTable(scaled, attention_factor)


@register
@dataclass(frozen=True)
class YaRN(PositionMethod):
    """YaRN (Peng et al., 2023, "YaRN: Efficient Context Window Extension of Large Language Models",
    eq. 18-20): NTK-by-parts frequencies plus an attention factor 0.1 ln(s) + 1 on cos and sin.
    """

    name = "yarn"
    factor: float
    original_length: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None

    def __post_init__(self) -> None:
        check_range(self.name, "factor", self.factor, low=0, low_open=True, high=MAX_SCALE)
        check_original_length(self)
        check_range(self.name, "beta_fast", self.beta_fast, low=0, low_open=True, high=MAX_SCALE)
        check_range(self.name, "beta_slow", self.beta_slow, low=0, low_open=True, high=MAX_SCALE)
        check_range(self.name, "attention_factor", self.attention_factor, low=0, low_open=True,
                    high=MAX_ATTENTION_FACTOR)  # fmt: skip

    def table(self, rope: RopeConfig, seq_len: int) -> FrequencyTable:
        return yarn_table(rope, self.factor, self.original_length, self.beta_fast, self.beta_slow,
                          self.attention_factor)  # fmt: skip

    def reach(self) -> int:
        return int(self.factor * self.original_length)


@register
@dataclass(frozen=True)
class DynamicYaRN(PositionMethod):
    """Dynamic YaRN (Peng et al., 2023, section 3.3): YaRN with s = max(1, n / L) recomputed for the
    current length n, so inputs within the training length see plain RoPE.
    """

    name = "dynamic_yarn"
    original_length: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    def __post_init__(self) -> None:
        check_original_length(self)
        check_range(self.name, "beta_fast", self.beta_fast, low=0, low_open=True, high=MAX_SCALE)
        check_range(self.name, "beta_slow", self.beta_slow, low=0, low_open=True, high=MAX_SCALE)

    def table(self, rope: RopeConfig, seq_len: int) -> FrequencyTable:
        factor = max(1.0, seq_len / self.original_length)
        if factor == 1.0:
            return FrequencyTable(rope.inv_freq())
        return yarn_table(rope, factor, self.original_length, self.beta_fast, self.beta_slow, None)
