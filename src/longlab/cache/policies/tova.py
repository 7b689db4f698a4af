"""``tova``: evict the token the current query attends to least, averaged over heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longlab.cache.policy import EvictionPolicy, ScoreContext
from longlab.method import register


@register
@dataclass(frozen=True)
class TOVA(EvictionPolicy):
    """TOVA (Oren et al., 2024, "Transformers are Multi-State RNNs", section 4, eq. 5): after each step
    drop the tokens with the lowest attention from the current (last) query, averaged over all heads
    of the layer, so a layer keeps one token set for every head. After a prompt the last prompt token
    is the query. Query-aware."""

    name = "tova"
    query_aware = True

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        last = ctx.mass(ctx.q[:, :, -1:], ctx.q_pos[:, -1:], ctx.q_valid[:, -1:])
        return last.mean(dim=1, keepdim=True).expand_as(last).double()
