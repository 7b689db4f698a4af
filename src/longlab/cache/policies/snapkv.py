"""``snapkv``: attention from an observation window of recent queries, pooled."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longlab.cache.policy import EvictionPolicy, ScoreContext, protect, recent
from longlab.errors import SpecError
from longlab.method import check_range, register


@register
@dataclass(frozen=True)
class SnapKV(EvictionPolicy):
    """SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation",
    section 4.2, algorithm 1): a key's score is the attention the last ``window`` queries give it,
    summed over the window and averaged over the query heads of its KV head, then smoothed by 1-D
    average pooling of width ``kernel``; keep the top ``budget`` per head and always the window itself
    (DESIGN 3.3). Query-aware when the question ends the prompt: its tokens are the window. The window
    queries (unrotated, at most ``window`` per layer) are kept so decoding steps score the same way."""

    name = "snapkv"
    query_aware = True
    window: int = 64
    kernel: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self.name, "window", self.window, low=1, integer=True)
        check_range(self.name, "kernel", self.kernel, low=1, integer=True)
        if self.kernel % 2 == 0:
            raise SpecError(
                f"{self.name}: parameter 'kernel' must be odd (a centred pooling window), got {self.kernel}"
            )

    def observation(self, ctx: ScoreContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The last ``window`` queries seen by this layer (this call's and earlier calls')."""
        state = ctx.layer.state
        q, pos, valid = ctx.q, ctx.q_pos, ctx.q_valid
        if "queries" in state:
            q = torch.cat((state["queries"], q), dim=2)
            pos = torch.cat((state["query_positions"], pos), dim=1)
            valid = torch.cat((state["query_valid"], valid), dim=1)
        state["queries"], state["query_positions"], state["query_valid"] = (
            q[:, :, -self.window :].contiguous(), pos[:, -self.window :], valid[:, -self.window :]
        )  # fmt: skip
        return state["queries"], state["query_positions"], state["query_valid"]

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        mass = ctx.mass(*self.observation(ctx))
        b, hk, n = mass.shape
        pooled = F.avg_pool1d(mass.view(b * hk, 1, n), self.kernel, stride=1, padding=self.kernel // 2)
        return protect(pooled.view(b, hk, n).double(), recent(ctx.positions, ctx.valid, self.window))
