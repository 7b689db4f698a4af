"""``ntk`` and ``dynamic_ntk``: NTK-aware scaling of the RoPE base."""

from __future__ import annotations

from dataclasses import dataclass

from longlab.method import MAX_SCALE, check_original_length, check_range, register
from longlab.positions.base import PositionMethod
from longlab.positions.rope import FrequencyTable, RopeConfig, base_inv_freq


def _ntk_table(rope: RopeConfig, base_multiplier: float) -> FrequencyTable:
    d = rope.head_dim
    return FrequencyTable(base_inv_freq(d, rope.base * base_multiplier ** (d / (d - 2))))


@register
@dataclass(frozen=True)
class NTK(PositionMethod):
    """NTK-aware scaled RoPE (bloc97, 2023; formalised in Peng et al., 2023, "YaRN", eq. 16):
    base b -> b * s^(d/(d-2)), which interpolates low frequencies and extrapolates high ones.
    """

    name = "ntk"
    factor: float
    original_length: int | None = None

    def __post_init__(self) -> None:
        check_range(self.name, "factor", self.factor, low=0, low_open=True, high=MAX_SCALE)
        check_original_length(self)

    def table(self, rope: RopeConfig, seq_len: int) -> FrequencyTable:
        return _ntk_table(rope, self.factor)

    def reach(self) -> int:
        return int(self.factor * self.original_length)


@register
@dataclass(frozen=True)
class DynamicNTK(PositionMethod):
    """Dynamic NTK (emozilla, 2023; YaRN paper section 3.3), with transformers' formula: for a
    sequence of n > L tokens the base is b * (s*n/L - (s-1))^(d/(d-2)); at n <= L plain RoPE.

    Keys are cached unrotated, so when n grows during generation every cached key is re-rotated
    with the new base (transformers keeps keys rotated with the base of the step that cached them).
    """

    name = "dynamic_ntk"
    factor: float = 1.0
    original_length: int | None = None

    def __post_init__(self) -> None:
        check_range(self.name, "factor", self.factor, low=0, low_open=True, high=MAX_SCALE)
        check_original_length(self)

    def table(self, rope: RopeConfig, seq_len: int) -> FrequencyTable:
        length = self.original_length
        n = max(seq_len, length)
        return _ntk_table(rope, self.factor * n / length - (self.factor - 1))
