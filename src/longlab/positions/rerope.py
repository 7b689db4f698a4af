"""``rerope`` and ``leaky_rerope``: rectified relative positions."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from longlab.method import MAX_SCALE, check_original_length, check_range, register
from longlab.positions.base import PositionMethod
from longlab.positions.rope import RopeConfig
from longlab.positions.segments import Affine, Constant, Segment


@register
@dataclass(frozen=True)
class ReRoPE(PositionMethod):
    """ReRoPE (Su, 2023, "Rectified Rotary Position Embeddings"; eq. 31 of the survey with k -> inf):
    the relative distance becomes min(i - j, w). Keys within w use normal RoPE; every farther key sees
    the query rotated at w and itself unrotated. Default w = L / 2 (longlab's choice).
    """

    name = "rerope"
    window: int | None = None

    def __post_init__(self) -> None:
        check_range(self.name, "window", self.window, low=1, integer=True)

    def resolve(self, rope: RopeConfig) -> ReRoPE:
        return self if self.window is not None else replace(self, window=max(1, rope.original_length // 2))

    def segments(self) -> tuple[Segment, ...]:
        w = self.window
        return (Segment(0, w), Segment(w, math.inf, None, Constant(w), Constant(0)))


@register
@dataclass(frozen=True)
class LeakyReRoPE(PositionMethod):
    """Leaky ReRoPE (Su, 2023; eq. 31 of the survey): distance i - j below w, else w + (i - j - w)/k,
    realised as query at p/k + w(1 - 1/k) and key at p/k. ``k = 1`` is plain RoPE.
    Defaults: w = L / 2, k = 16 (longlab's choice: reaches about 8.5 L within trained distances).
    """

    name = "leaky_rerope"
    window: int | None = None
    k: float = 16.0
    original_length: int | None = None

    def __post_init__(self) -> None:
        check_range(self.name, "window", self.window, low=1, integer=True)
        check_range(self.name, "k", self.k, low=1, high=MAX_SCALE)
        check_original_length(self)

    def resolve(self, rope: RopeConfig) -> LeakyReRoPE:
        resolved = super().resolve(rope)
        return resolved if resolved.window is not None else replace(resolved, window=max(1, rope.original_length // 2))

    def segments(self) -> tuple[Segment, ...]:
        w, k = self.window, self.k
        far = Segment(w, math.inf, None, Affine(1 / k, w * (1 - 1 / k)), Affine(1 / k))
        return (Segment(0, w), far)

    def reach(self) -> int:
        """w + (L - w) k: the longest input whose leaky distances stay below L."""
        return int(self.window + (self.original_length - self.window) * self.k)
