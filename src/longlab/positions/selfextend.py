"""``selfextend``: grouped attention for far keys, normal attention for neighbours."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from longlab.method import check_original_length, check_range, register
from longlab.positions.base import PositionMethod
from longlab.positions.rope import RopeConfig
from longlab.positions.segments import Grouped, Segment


@register
@dataclass(frozen=True)
class SelfExtend(PositionMethod):
    """SelfExtend (Jin et al., 2024, "LLM Maybe LongLM: Self-Extend LLM Context Window Without
    Tuning", eq. 3-4): keys within the neighbour window W keep normal RoPE; farther keys use grouped
    positions floor(j/G) and the query floor(i/G) + W - floor(W/G). Usable length about (L - W) G + W.
    Defaults: G = 4, W = L / 4 (longlab's choice, inside the paper's tested ranges).
    """

    name = "selfextend"
    group: int = 4
    window: int | None = None
    original_length: int | None = None

    def __post_init__(self) -> None:
        check_range(self.name, "group", self.group, low=1, integer=True)
        check_range(self.name, "window", self.window, low=1, integer=True)
        check_original_length(self)

    def resolve(self, rope: RopeConfig) -> SelfExtend:
        resolved = super().resolve(rope)
        return resolved if resolved.window is not None else replace(resolved, window=max(1, rope.original_length // 4))

    def segments(self) -> tuple[Segment, ...]:
        g, w = self.group, self.window
        far = Segment(w, math.inf, None, Grouped(g, w - w // g), Grouped(g))
        return (Segment(0, w), far)

    def reach(self) -> int:
        """(L - W) G + W: grouped far positions stay within the trained distances."""
        return (self.original_length - self.window) * self.group + self.window
