"""``linear``: Position Interpolation."""

from __future__ import annotations

from dataclasses import dataclass

from longlab.method import MAX_SCALE, check_original_length, check_range, register
from longlab.positions.base import PositionMethod
from longlab.positions.rope import FrequencyTable, RopeConfig


@register
@dataclass(frozen=True)
class Linear(PositionMethod):
    """Position Interpolation (Chen et al., 2023, "Extending Context Window of Large Language Models
    via Positional Interpolation", eq. 4): positions are divided by ``factor``, i.e. inv_freq / s.
    """

    name = "linear"
    factor: float
    original_length: int | None = None

    def __post_init__(self) -> None:
        check_range(self.name, "factor", self.factor, low=0, low_open=True, high=MAX_SCALE)
        check_original_length(self)

    def reach(self) -> int:
        return int(self.factor * self.original_length)

    def table(self, rope: RopeConfig, seq_len: int) -> FrequencyTable:
        return FrequencyTable(rope.inv_freq() / self.factor)
