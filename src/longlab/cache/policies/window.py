"""``window``: keep only the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longlab.cache.policy import EvictionPolicy, ScoreContext
from longlab.method import register


@register
@dataclass(frozen=True)
class Window(EvictionPolicy):
    """Window attention over the cache: keep the ``budget`` most recent tokens (Xiao et al., 2023,
    "Efficient Streaming Language Models with Attention Sinks", figure 1(b), the baseline that
    StreamingLLM fixes). Positions stay the original ones. Query-agnostic."""

    name = "window"

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        return ctx.positions.double()
