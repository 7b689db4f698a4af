"""``h2o``: heavy hitters (accumulated attention) plus recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longlab.cache.policy import EvictionPolicy, ScoreContext, protect, recent
from longlab.method import check_range, register


@register
@dataclass(frozen=True)
class H2O(EvictionPolicy):
    """H2O (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
    Language Models", section 3, algorithm 1): each key's score is the attention it has received,
    accumulated over every query so far (prompt and generated tokens); keep the ``recent`` fraction of
    the budget as the most recent tokens and fill the rest with the highest scores. The accumulated
    score is a per-entry float held with the entry. Query-aware (the prompt's question is among the
    queries)."""

    name = "h2o"
    query_aware = True
    recent: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self.name, "recent", self.recent, low=0, high=1)

    def new_fields(self, fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"mass": torch.zeros_like(fields["positions"], dtype=torch.float32)}

    def compress(self, ctx: ScoreContext) -> None:
        entries = ctx.layer.entries
        # every query of this call adds its probabilities: blockwise, never (L x L)
        entries.set("mass", entries.dense("mass") + ctx.mass(ctx.q, ctx.q_pos, ctx.q_valid))
        super().compress(ctx)

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        target = self.target(ctx)
        window = torch.round(self.recent * target.double()).long()
        return protect(ctx.layer.entries.dense("mass").double(), recent(ctx.positions, ctx.valid, window))
