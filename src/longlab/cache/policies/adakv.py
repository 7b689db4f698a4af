"""``adakv``: one budget per layer, shared among its heads by score."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longlab.cache.policies.snapkv import SnapKV
from longlab.cache.policy import ScoreContext, keep_top
from longlab.method import check_range, register


@register
@dataclass(frozen=True)
class AdaKV(SnapKV):
    """Ada-KV (Feng et al., 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget
    Allocation", section 4, algorithm 1): a layer's budget (``budget`` x KV heads) goes to the
    highest SnapKV scores across all its heads together, so concentrated heads give tokens to
    dispersed ones; each head first keeps ``floor`` x budget of its own best (the paper's safeguard,
    alpha = 0.2). Heads end up holding different counts — stored packed, not padded. Query-aware."""

    name = "adakv"
    floor: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self.name, "floor", self.floor, low=0, high=1)

    def select(self, ctx: ScoreContext, scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = ctx.valid
        b, hk, n = valid.shape
        guaranteed = keep_top(scores, valid, torch.floor(self.floor * target.double()).long())
        left = target * hk - guaranteed.sum(dim=(1, 2))
        pooled = scores.masked_fill(guaranteed, -math.inf).reshape(b, 1, hk * n)
        shared = keep_top(pooled, (valid & ~guaranteed).reshape(b, 1, hk * n), left)
        return guaranteed | shared.view(b, hk, n)

    def over_budget(self, held: torch.Tensor, target: torch.Tensor) -> bool:
        return bool((held.sum(dim=1) > target * held.shape[1]).any())
