"""``duo``: DuoAttention — retrieval heads keep the whole cache, streaming heads sinks + recent."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longlab.cache.heads import HeadAwarePolicy, ceil_count, head_aware_keep
from longlab.cache.policy import ScoreContext
from longlab.method import check_range, register


@register
@dataclass(frozen=True)
class Duo(HeadAwarePolicy):
    """DuoAttention (Xiao et al., 2024, "DuoAttention: Efficient Long-Context LLM Inference with
    Retrieval and Streaming Heads", arXiv 2410.10819, sections 3.1-3.3): a fraction ``sparsity`` of the
    KV heads (all layers ranked together, section 3.3's deployment) are *streaming heads* that keep
    the first ``sink`` tokens and the ``recent`` most recent ones; the others are *retrieval heads*
    and keep everything. A streaming head attends as StreamingLLM does here (``streaming``: positions
    are cache slots), so ``sparsity=1`` equals ``streaming:sinks=sink,window=recent`` and
    ``sparsity=0`` equals ``full``.

    The paper learns a gate per KV head by optimisation on synthetic passkey data (section 3.2). longlab
    measures instead, training-free (``longlab.bridge.heads``, docs/cache.md): a head's score is how much
    the passkey answer's loss rises when that head alone is made streaming, on ``samples`` of longlab's
    own passkey prompts of ``probe`` tokens (default: the model's training length) — the quantity the
    paper's distillation loss (eq. 1) penalises, one head at a time. The lowest scores become streaming
    heads. Scores are cached in a JSON file keyed by the weights' digest and these parameters (``scores``:
    its folder; default ``$LONGLAB_HEADS`` or ``~/.cache/longlab/heads``). Query-agnostic."""

    name = "duo"
    procedure = "passkey_loss"
    sparsity: float = 0.5
    sink: int = 64
    recent: int = 256
    samples: int = 8
    probe: int | None = None
    seed: int = 0
    scores: str | None = None

    def __post_init__(self) -> None:
        self.check_fraction("sparsity", self.sparsity)
        check_range(self.name, "sink", self.sink, low=0, integer=True)
        check_range(self.name, "recent", self.recent, low=1, integer=True)
        check_range(self.name, "samples", self.samples, low=1, integer=True)
        check_range(self.name, "probe", self.probe, low=64, integer=True)
        check_range(self.name, "seed", self.seed, low=0, integer=True)
        self.check_chunk()

    def streaming_count(self, heads: int) -> int:
        return ceil_count(self.sparsity, heads)

    def attention_positions(self, q_pos, k_pos, key_valid):
        """Retrieval heads at the tokens' own positions; streaming heads at cache slots, the queries
        at each head's last slots (B, Hk, Tq)."""
        streaming = ~self.layer_retrieval(k_pos.device)
        if not bool(streaming.any()):
            return q_pos, k_pos
        slots = torch.cumsum(key_valid.long(), dim=-1) - 1
        heads = streaming[None, :, None]
        b, hk, tq = k_pos.shape[0], k_pos.shape[1], q_pos.shape[1]
        queries = torch.where(heads, slots[:, :, -tq:], q_pos[:, None].expand(b, hk, tq))
        return queries, torch.where(heads, slots, k_pos)

    def compress(self, ctx: ScoreContext) -> None:
        valid = ctx.valid
        keep = head_aware_keep(ctx.positions, valid, self.layer_retrieval(valid.device), self.sink, self.recent)
        if bool((keep == valid).all()) and bool(valid.all()):
            return
        ctx.layer.entries.keep(keep)
