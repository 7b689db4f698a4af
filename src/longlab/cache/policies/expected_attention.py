"""``expected_attention``: the attention future queries are expected to give each key, from the
statistics of the current queries (Devoto et al., 2025)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longlab.cache.policy import EvictionPolicy, ScoreContext, protect, recent
from longlab.cache.rotation import expected_rotation
from longlab.method import check_range, register


@register
@dataclass(frozen=True)
class ExpectedAttention(EvictionPolicy):
    """Expected Attention (Devoto, Jeblick and Jégou, 2025, "Expected Attention: KV Cache Compression
    by Estimating Attention from Future Queries Distribution", section 3 (method); kvpress's
    ``ExpectedAttentionPress``). The queries of the current call (those at positions >= ``sinks``)
    are modelled as a Gaussian per query head, mean mu and covariance Sigma (divided by the count);
    the ``future`` next positions rotate it by their average RoPE rotation R̄; a key k then expects
    the unnormalised attention E[exp(q·k/√d)] = exp(R̄mu·k/√d + kᵀR̄ΣR̄ᵀk/(2d)) (the Gaussian's
    moment-generating function). These are soft-maxed over the held keys, averaged over the query heads
    of the KV head, and weighted by the value's norm: score = (a + ``epsilon``)·‖v‖, the expected
    contribution to the residual stream. The first ``sinks`` positions are always kept and left out of
    the softmax. ``covariance=false`` drops the second term, ``vnorm=false`` the value weighting.
    ``window=W`` (not in the paper; default 0) also always keeps the last W tokens: kvpress compresses
    the context alone and appends the question uncompressed, while longlab compresses whole prompts,
    so W at least the question's length restores that protocol.

    longlab caches keys unrotated, so R̄ is formed per key from the active position method's own
    rotations: for each of the ``future`` positions t that sees key j, the segment that admits the pair
    (t, j) says at which positions the query and the key turn; R̄_j is the mean of those relative
    rotations (longlab.cache.rotation). With plain RoPE, R̄_j = mean_t R(p_j − t) and the score equals
    kvpress's (mean query rotated by mean_t R(t), against the key rotated at p_j). Under a remapping
    method (SelfExtend, ReRoPE, DCA…) near and far future queries turn the pair differently, and the
    average is over what each would really use; a key no future query sees (LM-Infinite's band)
    scores 0. Query-aware: the question ending the prompt is among the queries."""

    name = "expected_attention"
    query_aware = True
    future: int = 512
    sinks: int = 4
    covariance: bool = True
    vnorm: bool = True
    epsilon: float = 0.0
    window: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self.name, "future", self.future, low=1, integer=True)
        check_range(self.name, "sinks", self.sinks, low=0, integer=True)
        check_range(self.name, "epsilon", self.epsilon, low=0)
        check_range(self.name, "window", self.window, low=0, integer=True)

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        q = ctx.q.double()
        b, hq, _, d = q.shape
        hk = ctx.layer.entries.heads
        # the Gaussian of the call's queries, sinks and padding left out (eq. 4)
        used = (ctx.q_valid & (ctx.q_pos >= self.sinks)).double()[:, None, :, None]  # (B, 1, Tq, 1)
        count = used.sum(dim=2, keepdim=True).clamp(min=1)
        mean = (q * used).sum(dim=2, keepdim=True) / count
        centred = (q - mean) * used
        mean = mean.view(b, hk, hq // hk, d)
        # the next query sits after the last real one of its row
        valid_pos = ctx.q_pos.masked_fill(~ctx.q_valid, -1)
        start = valid_pos.amax(dim=1) + 1
        keys, seen = expected_rotation(ctx.keys.double(), ctx.positions, ctx.valid, start, self.future,
                                       ctx.segments, ctx.table)  # fmt: skip
        logits = ctx.scale * torch.einsum("bhgd,bhnd->bhgn", mean, keys)
        if self.covariance:
            cov = (torch.einsum("bhti,bhtj->bhij", centred, centred) / count.view(b, 1, 1, 1)).view(b, hk, -1, d, d)
            logits = logits + ctx.scale**2 / 2 * torch.einsum("bhnd,bhgde,bhne->bhgn", keys, cov, keys)
        sink = ctx.valid & (ctx.positions < self.sinks)
        scored = (ctx.valid & seen & ~sink)[:, :, None]
        probabilities = torch.softmax(logits.masked_fill(~scored, -torch.inf), dim=-1).nan_to_num(0.0).mean(dim=2)
        if self.vnorm:
            values = ctx.layer.entries.dense("values").double()
            probabilities = (probabilities + self.epsilon) * torch.linalg.vector_norm(values, dim=-1)
        kept = sink | recent(ctx.positions, ctx.valid, self.window)
        return protect(probabilities.masked_fill(~seen, 0.0), kept)  # no future query reads an unseen key
