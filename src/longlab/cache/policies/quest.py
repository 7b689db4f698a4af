"""``quest``: query-aware sparse decoding over pages of the full cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longlab.cache.pages import PagedEntries, choose_pages, key_maps, page_bounds, page_entries
from longlab.cache.policy import CachePolicy, Reads, ScoreContext
from longlab.errors import SpecError
from longlab.method import check_order, check_range, register


@register
@dataclass(frozen=True)
class Quest(CachePolicy):
    """Quest (Tang et al., 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference",
    section 3.3 and figure 5): the cache keeps every token, in pages of ``page`` entries with the
    channel-wise minimum m and maximum M of their keys; a decoding query q scores each page by the
    upper bound sum_i max(q_i m_i, q_i M_i) of its keys' logits and attention reads only the top
    ``budget // page`` pages (exact attention over them). The newest page, which holds the query's own
    token, is always read. Prefill attention stays dense, as do the first ``skip_layers`` layers (the
    paper's default: 2, whose attention is not sparse). GQA: a KV head's pages are chosen for its
    query group together, by the sum of the group's bounds.

    Keys are cached unrotated (docs/design.md); the bounds are over the keys as attention sees them —
    rotated at each segment's key map — and the query is rotated at the segment's query map, so for
    each segment the bound is the paper's, exactly (docs/cache.md). Nothing is evicted: memory held
    is the full cache plus the page bounds; ``longlab.cache_stats`` reports the bytes read per step.
    """

    name = "quest"
    query_aware = True
    budget: int | None = None
    page: int = 16
    skip_layers: int = 2

    def __post_init__(self) -> None:
        check_range(self.name, "budget", self.budget, low=1, integer=True)
        check_range(self.name, "page", self.page, low=1, integer=True)
        check_range(self.name, "skip_layers", self.skip_layers, low=0, integer=True)
        self.check_chunk()
        if self.budget is None:
            raise SpecError(
                f"{self.name}: parameter 'budget' (tokens read per decoding step, e.g. budget=1024) is required"
            )
        check_order(self.name, "page", self.page, "budget", self.budget, strict=False)

    @property
    def pages_read(self) -> int:
        """Pages a decoding query reads (the paper's token budget / page size)."""
        return self.budget // self.page

    def new_store(self, fields: dict[str, torch.Tensor]) -> PagedEntries:
        return PagedEntries.paged(fields, self.page)

    def reads(self, ctx: ScoreContext, keys, values, k_pos, key_valid) -> Reads:
        store: PagedEntries = ctx.layer.entries
        if ctx.layer_idx < self.skip_layers:  # dense layers keep no page bounds
            return Reads(keys, values, k_pos, key_valid, store.entry_nbytes)
        with torch.no_grad():  # the bounds and the choice of pages are decisions, not differentiated
            store.refresh(key_maps(ctx.segments), ctx.table)
            if ctx.q.shape[2] != 1 or store.pages <= self.pages_read:  # prefill, or every page fits
                return Reads(keys, values, k_pos, key_valid, store.entry_nbytes)
            bounds = page_bounds(store, ctx.q[:, :, 0], ctx.q_pos[:, 0], ctx.segments, ctx.table)
            index = page_entries(choose_pages(bounds, self.pages_read), self.page, keys.shape[2])
        d = keys.shape[-1]
        gathered = index[..., None].expand(*index.shape, d)
        keys, values = keys.gather(2, gathered), values.gather(2, gathered)
        k_pos, key_valid = k_pos.gather(2, index), key_valid.gather(2, index)
        per_entry = store.entry_nbytes // (store.rows * store.longest)  # keys, values, position
        return Reads(keys, values, k_pos, key_valid, store.rows * index.shape[-1] * per_entry + store.page_nbytes)
