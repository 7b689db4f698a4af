"""Segments: how a position method splits the keys of each query into ranges with one rotation rule.

Every extension method is a set of segments (docs/design.md). A segment selects the keys at relative
distance ``min_distance <= q_pos - k_pos < max_distance`` (optionally only keys whose position is below
``key_limit``, and optionally only keys whose chunk lags the query's chunk by ``min_chunk_lag <=
q_pos // chunk - k_pos // chunk < max_chunk_lag``) and says at which positions the query and the key
are rotated for that range. The kernel computes each segment blockwise and merges the pieces by
log-sum-exp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

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


@dataclass(frozen=True)
class Modulo:
    """Rotate at ``min(positions mod size + shift, cap)`` (Dual Chunk Attention's in-chunk positions)."""

    size: int
    shift: int = 0
    cap: int | None = None

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        local = torch.remainder(positions, self.size) + self.shift
        if self.cap is not None:
            local = local.clamp(max=self.cap)
        return local.float()

    def __str__(self) -> str:
        text = f"p mod {self.size}" + (f"+{self.shift}" if self.shift else "")
        return f"min({text}, {self.cap})" if self.cap is not None else text


PositionMap = Identity | Constant | Affine | Grouped | Modulo


@dataclass(frozen=True)
class Segment:
    min_distance: int = 0
    max_distance: float = math.inf
    key_limit: int | None = None
    query_map: PositionMap = field(default_factory=Identity)
    key_map: PositionMap = field(default_factory=Identity)
    # Chunk membership (Dual Chunk Attention): with ``chunk`` set, only pairs whose chunk lag
    # q_pos // chunk - k_pos // chunk lies in [min_chunk_lag, max_chunk_lag) are admitted.
    chunk: int | None = None
    min_chunk_lag: int = 0
    max_chunk_lag: float = math.inf

    def __post_init__(self) -> None:
        if self.min_distance < 0 or self.max_distance <= self.min_distance:
            raise ValueError(f"segment needs 0 <= min_distance < max_distance, got {self}")
        if self.chunk is not None and (
            self.chunk < 1 or self.min_chunk_lag < 0 or self.max_chunk_lag <= self.min_chunk_lag
        ):
            raise ValueError(f"segment needs chunk >= 1 and 0 <= min_chunk_lag < max_chunk_lag, got {self}")

    def admits(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Which (query, key) pairs this segment takes: q_pos (..., Tq), k_pos (..., Tk) -> (..., Tq, Tk).

        Causal by position (a key after the query is never admitted), then the segment's distance
        range, key limit and chunk lag. The one definition the kernel's masks and the cache's scores
        share.
        """
        distance = q_pos[..., :, None] - k_pos[..., None, :]
        allowed = (distance >= max(self.min_distance, 0)) & (distance < self.max_distance)
        if self.key_limit is not None:
            allowed &= (k_pos < self.key_limit)[..., None, :]
        if self.chunk is not None:
            lag = chunk_of(q_pos, self.chunk)[..., :, None] - chunk_of(k_pos, self.chunk)[..., None, :]
            allowed &= (lag >= self.min_chunk_lag) & (lag < self.max_chunk_lag)
        return allowed

    @property
    def by_distance(self) -> bool:
        """True when the segment admits a pair by its distance alone (no key limit, no chunks)."""
        return self.key_limit is None and self.chunk is None

    @property
    def unbounded(self) -> bool:
        """True when the segment covers every causal key with plain rotations."""
        return (
            self.min_distance == 0
            and self.max_distance == math.inf
            and self.by_distance
            and isinstance(self.query_map, Identity)
            and isinstance(self.key_map, Identity)
        )

    def clipped(self, max_distance: float) -> Segment | None:
        """This segment restricted to distances below ``max_distance`` (None when nothing remains)."""
        if max_distance <= self.min_distance:
            return None
        return replace(self, max_distance=min(self.max_distance, max_distance))

    def __str__(self) -> str:
        limit = f", k_pos<{self.key_limit}" if self.key_limit is not None else ""
        if self.chunk is not None:
            limit += f", chunk lag in [{self.min_chunk_lag}, {self.max_chunk_lag:g}) of {self.chunk}"
        return f"[{self.min_distance}, {self.max_distance:g}){limit}: q@{self.query_map} k@{self.key_map}"


def chunk_of(positions: torch.Tensor, chunk: int) -> torch.Tensor:
    """The chunk index floor(p / chunk) of integer positions."""
    return torch.div(positions, chunk, rounding_mode="floor")
