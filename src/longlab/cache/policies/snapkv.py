"""``snapkv``: attention from an observation window of recent queries, pooled."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longlab.cache.policy import EvictionPolicy, ScoreContext, protect, recent
from longlab.errors import SpecError
from longlab.method import check_range, register

_POOLS = {"avg": F.avg_pool1d, "max": F.max_pool1d}


@register
@dataclass(frozen=True)
class SnapKV(EvictionPolicy):
    """SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation",
    section 4.2, algorithm 1): a key's score is the attention the last ``window`` queries give it,
    summed over the window and averaged over the query heads of its KV head, then smoothed by 1-D
    pooling of width ``kernel`` so a kept token brings its neighbours (``pooling``: ``avg`` as in
    kvpress and PyramidKV's code, or ``max``, the reference code's other option); keep the top
    ``budget`` per head and always the window itself (docs/cache.md). Query-aware when the question
    ends the prompt: its tokens are the window. The window is the last queries of the current call —
    a prompt, a prefill chunk, or while decoding the one new token — so no queries are kept between
    calls."""

    name = "snapkv"
    query_aware = True
    window: int = 64
    kernel: int = 5
    pooling: str = "avg"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self.name, "window", self.window, low=1, integer=True)
        check_range(self.name, "kernel", self.kernel, low=1, integer=True)
        if self.kernel % 2 == 0:
            raise SpecError(
                f"{self.name}: parameter 'kernel' must be odd (a centred pooling window), got {self.kernel}"
            )
        if self.pooling not in _POOLS:
            raise SpecError(
                f"{self.name}: parameter 'pooling' must be one of {', '.join(_POOLS)}, got {self.pooling!r}"
            )

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        window = slice(-self.window, None)
        mass = ctx.mass(ctx.q[:, :, window], ctx.q_pos[:, window], ctx.q_valid[:, window])
        b, hk, n = mass.shape
        pooled = _POOLS[self.pooling](mass.view(b * hk, 1, n), self.kernel, stride=1, padding=self.kernel // 2)
        return protect(pooled.view(b, hk, n).double(), recent(ctx.positions, ctx.valid, self.window))
