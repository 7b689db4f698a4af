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
        # Drawn on the host on purpose, then moved: a CUDA generator draws another stream from the same
        # seed, and the same seed must evict the same entries on every device (tests/cache/test_cache.py).
        seed = self.seed * 1_000_003 + ctx.layer_idx * 65_537 + ctx.layer.seen
        generator = torch.Generator(device="cpu").manual_seed(seed)
        draws = torch.rand(ctx.valid.shape, generator=generator, dtype=torch.float64, device="cpu")
        return draws.to(ctx.valid.device)
