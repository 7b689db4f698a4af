"""Segments: how a position method splits the keys of each query into ranges with one rotation rule.

Every extension method is a set of segments (docs/design.md). A segment selects the keys at relative
distance ``min_distance <= q_pos - k_pos < max_distance`` (optionally only keys whose position is below
``key_limit``) and says at which positions the query and the key are rotated for that range. The
kernel computes each segment blockwise and merges the pieces by log-sum-exp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Identity:
    """Rotate at the token's own position."""

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        return positions

    def __str__(self) -> str:
        return "p"


@dataclass(frozen=True)
class Constant:
    """Rotate every token at one fixed position (``value``)."""

    value: float

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        return torch.full(positions.shape, float(self.value), device=positions.device)

    def __str__(self) -> str:
        return f"{self.value:g}"


@dataclass(frozen=True)
class Affine:
    """Rotate at ``positions * scale + shift``."""

    scale: float
    shift: float = 0.0

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        return positions.float() * self.scale + self.shift

    def __str__(self) -> str:
        return f"p*{self.scale:g}+{self.shift:g}"


@dataclass(frozen=True)
class Grouped:
    """Rotate at ``floor(positions / group) + shift`` (SelfExtend's grouped attention)."""

    group: int
    shift: int = 0

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        return torch.div(positions, self.group, rounding_mode="floor").float() + self.shift

    def __str__(self) -> str:
        return f"floor(p/{self.group})+{self.shift}"


PositionMap = Identity | Constant | Affine | Grouped


@dataclass(frozen=True)
class Segment:
    min_distance: int = 0
    max_distance: float = math.inf
    key_limit: int | None = None
    query_map: PositionMap = field(default_factory=Identity)
    key_map: PositionMap = field(default_factory=Identity)

    def __post_init__(self) -> None:
        if self.min_distance < 0 or self.max_distance <= self.min_distance:
            raise ValueError(f"segment needs 0 <= min_distance < max_distance, got {self}")

    def admits(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Which (query, key) pairs this segment takes: q_pos (..., Tq), k_pos (..., Tk) -> (..., Tq, Tk).

        Causal by position (a key after the query is never admitted), then the segment's distance
        range and key limit. The one definition the kernel's masks and the cache's scores share.
        """
        distance = q_pos[..., :, None] - k_pos[..., None, :]
        allowed = (distance >= max(self.min_distance, 0)) & (distance < self.max_distance)
        if self.key_limit is not None:
            allowed &= (k_pos < self.key_limit)[..., None, :]
        return allowed

    @property
    def unbounded(self) -> bool:
        """True when the segment covers every causal key with plain rotations."""
        return (
            self.min_distance == 0
            and self.max_distance == math.inf
            and self.key_limit is None
            and isinstance(self.query_map, Identity)
            and isinstance(self.key_map, Identity)
        )

    def clipped(self, max_distance: float) -> Segment | None:
        """This segment restricted to distances below ``max_distance`` (None when nothing remains)."""
        if max_distance <= self.min_distance:
            return None
        return Segment(
            self.min_distance,
            min(self.max_distance, max_distance),
            self.key_limit,
            self.query_map,
            self.key_map,
        )

    def __str__(self) -> str:
        limit = f", k_pos<{self.key_limit}" if self.key_limit is not None else ""
        return f"[{self.min_distance}, {self.max_distance:g}){limit}: q@{self.query_map} k@{self.key_map}"
