"""``random``: evict uniformly at random (the baseline every scored policy must beat)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longlab.cache.policy import EvictionPolicy, ScoreContext
from longlab.method import check_range, register


@register
@dataclass(frozen=True)
class Random(EvictionPolicy):
    """Random eviction, seeded: the same (seed, layer, tokens seen) always evicts the same entries.
    The baseline used by kvpress and the eviction literature. Query-agnostic."""

    name = "random"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self.name, "seed", self.seed, low=0, integer=True)

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.layer_idx * 65_537 + ctx.layer.seen)
        # drawn on the CPU's generator, then moved: the same seed evicts the same entries on every device
        draws = torch.rand(ctx.valid.shape, generator=generator, dtype=torch.float64, device="cpu")
        return draws.to(ctx.valid.device)
