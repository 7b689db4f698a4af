"""``retrieval_attention``: sinks + a local window held, the far keys read by kNN retrieval per query head."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longlab.cache.entries import Entries
from longlab.cache.far import FarStore
from longlab.cache.policy import CachePolicy, Reads, ScoreContext, keep_top, protect
from longlab.errors import LonglabError
from longlab.method import check_range, register
from longlab.positions.rope import rotate
from longlab.positions.segments import Segment


def far_segment(segments: tuple[Segment, ...]) -> Segment:
    """The segment of the position method that far keys fall in (the last unbounded one: plain RoPE's
    only segment, SelfExtend's grouped one, DCA's inter-chunk one); its query and key maps are the
    positions the index rotates at, so its inner products are the logits attention gives far keys."""
    return next((s for s in reversed(segments) if math.isinf(s.max_distance) and s.key_limit is None), segments[-1])


class RetrievalEntries(Entries):
    """The held entries (sinks + local window) of a layer, plus its :class:`FarStore`. ``nbytes``
    counts the held entries only: the far store is reported apart (``far_nbytes``)."""

    far: FarStore | None = None

    @property
    def far_nbytes(self) -> int:
        return 0 if self.far is None else self.far.nbytes

    def select(self, batch_indices: torch.Tensor) -> None:
        raise LonglabError(
            "retrieval_attention keeps far keys in a per-row index that cannot be reordered: "
            "use greedy or sampling decoding (no beam or contrastive search)"
        )


@register
@dataclass(frozen=True)
class RetrievalAttention(CachePolicy):
    """Retrieval attention during decoding, in the manner of the Memorizing Transformer (Wu et al.,
    2022, section 3: kNN lookup of (key, value) pairs from an external memory), InfLLM (Xiao et al.,
    2024, section 3.1: initial + local tokens always attended) and RetrievalAttention (Liu et al.,
    2024, section 3: per-head vector search of the far keys by the query's inner product).

    Each layer holds the first ``sinks`` tokens and the ``window`` most recent ones; every other
    token moves to a far store whose index holds its key rotated at its position as far keys are
    rotated (:func:`far_segment`: its own position under plain RoPE, chunk-relative under DCA, grouped
    under SelfExtend) (``cache.far``: faiss on the CPU, exact ``torch.topk`` on other devices). A
    decoding query (one token) reads the held tokens plus, per query head, the ``top_k`` far keys with
    the largest logit ``R(f_q(i)) q . R(f_k(j)) k``; attention is exact over that set, with the active
    position method's rotation.
    Calls of more than one token (the prompt, prefill chunks) read everything: the approximation is
    decoding-time only, as in RetrievalAttention.

    Why a cache policy and not a context method: it changes what each decoding query reads from the
    KV cache, not what text the model reads, and it needs the layer's keys, so it lives beside the
    other policies and composes with every position method (``dca+retrieval_attention:top_k=64``).
    With ``top_k`` at least the number of far tokens it is exactly full attention.
    """

    name = "retrieval_attention"
    sinks: int = 4
    window: int = 256
    top_k: int = 64

    def __post_init__(self) -> None:
        check_range(self.name, "sinks", self.sinks, low=0, integer=True)
        check_range(self.name, "window", self.window, low=1, integer=True)
        check_range(self.name, "top_k", self.top_k, low=1, integer=True)
        self.check_chunk()

    def new_store(self, fields: dict[str, torch.Tensor]) -> Entries:
        return RetrievalEntries.from_dense(fields)

    def reads(self, ctx: ScoreContext, keys, values, positions, valid) -> Reads:
        held_bytes = ctx.layer.nbytes
        far: FarStore | None = ctx.layer.entries.far
        if far is None or far.length == 0:
            return Reads(keys, values, positions, valid, held_bytes)
        b, hk, _, d = keys.shape
        q = ctx.q
        if q.shape[2] > 1:  # a prompt or prefill chunk reads every token, held and far
            everything = far.everything()
            far_k, far_v, far_pos = (x.reshape(b, hk, far.length, *x.shape[2:]) for x in everything)
            positions = torch.cat((far_pos.long(), positions), dim=2)
            return Reads(torch.cat((far_k, keys), dim=2), torch.cat((far_v, values), dim=2), positions, positions >= 0,
                         held_bytes + sum(x.nbytes for x in everything))  # fmt: skip
        hq = q.shape[1]
        group = hq // hk
        rotated_q = rotate(q, far_segment(ctx.segments).query_map(ctx.q_pos), ctx.table)  # as far keys see it
        slots = far.index.search(rotated_q.reshape(b * hk, group, d), self.top_k)  # (B * Hk, G, k)
        k = slots.shape[-1]
        got_k, got_v, got_pos = far.gather(slots.reshape(b * hk, group * k))
        fetched = got_k.nbytes + got_v.nbytes + got_pos.nbytes
        got_k, got_v = (x.view(b, hq, k, d) for x in (got_k, got_v))
        got_pos = got_pos.view(b, hq, k).long()
        held_k, held_v, held_pos = (x.repeat_interleave(group, dim=1) for x in (keys, values, positions))
        positions = torch.cat((got_pos, held_pos), dim=2)
        return Reads(torch.cat((got_k, held_k), dim=2), torch.cat((got_v, held_v), dim=2), positions, positions >= 0,
                     held_bytes + fetched)  # fmt: skip

    def compress(self, ctx: ScoreContext) -> None:
        entries: RetrievalEntries = ctx.layer.entries
        valid = ctx.valid
        if bool((entries.counts() <= self.sinks + self.window).all()) and bool(valid.all()):
            return
        positions = ctx.positions
        b = valid.shape[0]
        sinks = keep_top(-positions.double(), valid, torch.full((b,), self.sinks, device=valid.device))
        held = keep_top(protect(positions.double(), sinks), valid, torch.full((b,), self.sinks + self.window,
                                                                              device=valid.device))  # fmt: skip
        leaving = valid & ~held
        if bool(leaving.any()):
            self._move_far(ctx, entries, leaving)
        entries.keep(held)

    def _move_far(self, ctx: ScoreContext, entries: RetrievalEntries, leaving: torch.Tensor) -> None:
        """Move the entries marked ``leaving`` (B, Hk, N) to the far store, each row's left-padded to
        the longest row's count (padding at position -1, never found)."""
        b, hk, _ = leaving.shape
        count = leaving.sum(-1)
        width = int(count.max())
        # rank of each leaving entry among its row's, shifted right so every row ends at `width`
        slot = torch.cumsum(leaving.long(), -1) - 1 + (width - count)[..., None]
        target = torch.where(leaving, slot, torch.full_like(slot, width))  # `width` = a discard column
        keys, values = entries.dense("keys"), entries.dense("values")
        d = keys.shape[-1]
        out_k = keys.new_zeros((b, hk, width + 1, d)).scatter_(2, target[..., None].expand(-1, -1, -1, d), keys)
        out_v = values.new_zeros((b, hk, width + 1, d)).scatter_(2, target[..., None].expand(-1, -1, -1, d), values)
        out_pos = torch.full((b, hk, width + 1), -1, dtype=torch.long, device=keys.device)
        out_pos = out_pos.scatter_(2, target, ctx.positions.masked_fill(~leaving, -1))
        out_k, out_v, out_pos = out_k[:, :, :width], out_v[:, :, :width], out_pos[:, :, :width]
        rows = b * hk
        key_pos = far_segment(ctx.segments).key_map(out_pos.clamp(min=0).reshape(rows, width))
        rotated = rotate(out_k.reshape(rows, 1, width, d), key_pos, ctx.table)
        if entries.far is None:
            entries.far = FarStore(keys.device)
        entries.far.add(out_k.reshape(rows, width, d), out_v.reshape(rows, width, d),
                        out_pos.reshape(rows, width).to(torch.int32), rotated.reshape(rows, width, d))  # fmt: skip
