"""``streaming``: StreamingLLM — attention sinks plus a recent window, positions = cache slots."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longlab.cache.policy import CachePolicy, ScoreContext, keep_top, protect
from longlab.method import check_range, register


@register
@dataclass(frozen=True)
class Streaming(CachePolicy):
    """StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks",
    section 3.2): keep the first ``sinks`` tokens and the ``window`` most recent ones. Positions are
    assigned by slot in the cache, not by the original text: the i-th held key is rotated at
    position i and the query at its own slot, so no distance exceeds sinks + window (the paper's
    rule, possible here because keys are cached before RoPE). Query-agnostic."""

    name = "streaming"
    sinks: int = 4
    window: int = 1020

    def __post_init__(self) -> None:
        check_range(self.name, "sinks", self.sinks, low=0, integer=True)
        check_range(self.name, "window", self.window, low=1, integer=True)
        self.check_chunk()

    def attention_positions(self, q_pos, k_pos, key_valid):
        """Positions are cache slots: each held key at its index among the valid entries of its row,
        the new queries at the last slots."""
        slots = torch.cumsum(key_valid.long(), dim=-1) - 1
        return slots[:, 0, -q_pos.shape[1] :], slots

    def compress(self, ctx: ScoreContext) -> None:
        valid = ctx.valid
        if bool((ctx.layer.entries.counts() <= self.sinks + self.window).all()) and bool(valid.all()):
            return
        positions = ctx.positions.double()
        # the sinks are the first `sinks` real tokens: rank them by earliest position
        sinks = keep_top(-positions, valid, torch.full((valid.shape[0],), self.sinks, device=valid.device))
        scores = protect(positions, sinks)
        ctx.layer.entries.keep(
            keep_top(scores, valid, torch.full((valid.shape[0],), self.sinks + self.window, device=valid.device))
        )
