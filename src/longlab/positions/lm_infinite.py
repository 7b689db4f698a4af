"""``lm_infinite``: a local band plus a few global tokens at capped distance."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from longlab.method import check_original_length, check_range, register
from longlab.positions.base import PositionMethod
from longlab.positions.rope import RopeConfig
from longlab.positions.segments import Constant, Segment


@register
@dataclass(frozen=True)
class LMInfinite(PositionMethod):
    """LM-Infinite (Han et al., 2024, "LM-Infinite: Zero-Shot Extreme Length Generalization for Large
    Language Models", section 4): a Lambda-shaped mask -- every query sees the keys within ``band``
    and the first ``n_global`` tokens; the global tokens' distances are capped at the training length L
    (min(i - j, L)), so a band at least as long as the input is plain RoPE.
    Defaults from the paper: band = L, n_global = 10.
    """

    name = "lm_infinite"
    band: int | None = None
    n_global: int = 10
    original_length: int | None = None

    def __post_init__(self) -> None:
        check_range(self.name, "band", self.band, low=1, integer=True)
        check_range(self.name, "n_global", self.n_global, low=0, integer=True)
        check_original_length(self)

    def resolve(self, rope: RopeConfig) -> LMInfinite:
        resolved = super().resolve(rope)
        return resolved if resolved.band is not None else replace(resolved, band=resolved.original_length)

    def segments(self) -> tuple[Segment, ...]:
        band, cap = self.band, self.original_length
        parts = [Segment(0, band)]
        if self.n_global:
            if band < cap:  # global keys nearer than L keep their true distance
                parts.append(Segment(band, cap, self.n_global))
            # query at L, key at 0: the distance is exactly L
            parts.append(Segment(max(band, cap), math.inf, self.n_global, Constant(cap), Constant(0)))
        return tuple(parts)
