"""``sliding``: attend only to the last L keys (a sliding window at the training length).

(The name ``window`` belongs to the cache policy that keeps only recent keys, ``longlab.cache``.)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from longlab.method import check_range, register
from longlab.positions.base import PositionMethod
from longlab.positions.rope import RopeConfig
from longlab.positions.segments import Segment


@register
@dataclass(frozen=True)
class Sliding(PositionMethod):
    """Sliding-window attention (Beltagy et al., 2020, "Longformer", section 3.1, causal form): each
    query sees the ``size`` most recent keys, itself included, so no distance exceeds training.
    Default size = L.
    """

    name = "sliding"
    size: int | None = None

    def __post_init__(self) -> None:
        check_range(self.name, "size", self.size, low=1, integer=True)

    def resolve(self, rope: RopeConfig) -> Sliding:
        return self if self.size is not None else replace(self, size=rope.original_length)

    def segments(self) -> tuple[Segment, ...]:
        return (Segment(0, self.size),)
