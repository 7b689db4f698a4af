"""``kerple_power``: KERPLE's power kernel bias, learned per head."""

from __future__ import annotations

from dataclasses import dataclass

from longlab.lab.positions.base import LabPosition, ModelShape, PositionModule
from longlab.lab.positions.kerple_log import KerpleModule
from longlab.lab.registry import register
from longlab.method import check_range


@register
@dataclass(frozen=True)
class KerplePower(LabPosition):
    """KERPLE, power variant (Chi et al., 2022, "KERPLE: Kernelized Relative Positional Embedding for
    Length Extrapolation", §4, eq. 6): score(i, j) += -r1_h |i - j|^r2_h, r1 > 0 and 0 < r2 <= 2
    learned per head. ``r1``, ``r2`` are initial values (r1 = 0: NoPE at start)."""

    name = "kerple_power"
    r1: float = 1.0
    r2: float = 1.0

    def __post_init__(self) -> None:
        check_range(self.name, "r1", self.r1, low=0.0)
        check_range(self.name, "r2", self.r2, low=0.0, low_open=True, high=2.0)

    def build(self, shape: ModelShape) -> PositionModule:
        return KerpleModule(shape.heads, self.r1, self.r2, log=False)
