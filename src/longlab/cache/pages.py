"""Pages of keys with channel-wise bounds, for query-aware page selection (Quest, docs/cache.md).

Keys are cached unrotated (docs/design.md) and each segment of the position method rotates them at its
own key map (``Identity``, ``Grouped``, ``Modulo``, ...). A key map depends on the key's position
only, so a page's channel-wise minimum and maximum of the keys *as a segment rotates them* are fixed
once the page is full: they are kept per distinct key map, and only the newest (partial) page is
recomputed as tokens arrive. A query is rotated at each segment's query map, and the page's upper
bound is the largest segment bound among the segments that may admit one of its keys.
"""

from __future__ import annotations

import math

import torch

from longlab.cache.entries import Entries
from longlab.positions.rope import FrequencyTable, rotate
from longlab.positions.segments import PositionMap, Segment, chunk_of


class PagedEntries(Entries):
    """Entries (nothing is evicted) plus, per page of ``page`` entries of each (batch row, KV head),
    the channel-wise min and max of its keys rotated at each key map, and its first and last real
    position. Pages are runs of entries in the dense view: page j holds entries [j*page, (j+1)*page)."""

    def __init__(self, batch: int, heads: int, fields: dict[str, torch.Tensor], lengths: torch.Tensor, page: int):
        super().__init__(batch, heads, fields, lengths)
        self.page = page
        self.reset_pages()

    @classmethod
    def paged(cls, fields: dict[str, torch.Tensor], page: int) -> PagedEntries:
        plain = Entries.from_dense(fields)
        return cls(plain.batch, plain.heads, plain.fields, plain.lengths, page)

    def reset_pages(self) -> None:
        self.maps: tuple[PositionMap, ...] = ()
        self.low: dict[PositionMap, torch.Tensor] = {}  # (B, H, P, d) per key map
        self.high: dict[PositionMap, torch.Tensor] = {}
        self.first: torch.Tensor | None = None  # (B, H, P) int32, first real position (-1: no real entry)
        self.last: torch.Tensor | None = None  # (B, H, P) int32, last real position (-1: no real entry)
        self.summarized = 0  # entries the page bounds cover
        self.table: FrequencyTable | None = None

    @property
    def pages(self) -> int:
        return 0 if self.first is None else self.first.shape[-1]

    @property
    def entry_nbytes(self) -> int:
        """Bytes of the entries alone (keys, values, positions), without the page bounds."""
        return super().nbytes

    @property
    def page_nbytes(self) -> int:
        """Bytes of the page bounds: min and max per key map, first and last position."""
        tensors = [*self.low.values(), *self.high.values(), self.first, self.last]
        return sum(t.nbytes for t in tensors if t is not None)

    @property
    def nbytes(self) -> int:
        return self.entry_nbytes + self.page_nbytes

    def refresh(self, maps: tuple[PositionMap, ...], table: FrequencyTable) -> None:
        """Bring the page bounds up to date with the entries, rotated at ``maps`` with ``table``.

        Only pages holding entries the bounds do not cover yet are (re)computed — while decoding, the
        newest page — unless the key maps or the table changed (dynamic frequency methods change their
        table with the length): then every page is recomputed, as the keys attention sees changed.
        """
        if maps != self.maps or not _same_table(table, self.table):
            self.reset_pages()
            self.maps, self.table = maps, table
        n = self.longest
        if self.summarized == n:
            return
        start = self.summarized // self.page  # the first page with entries not covered
        keys = self.dense("keys")[:, :, start * self.page :]
        positions = self.dense("positions")[:, :, start * self.page :].long()
        count = math.ceil(keys.shape[2] / self.page)
        pad = count * self.page - keys.shape[2]
        if pad:
            keys = torch.nn.functional.pad(keys, (0, 0, 0, pad))
            positions = torch.nn.functional.pad(positions, (0, pad), value=-1)
        b, h, t, d = keys.shape
        real = (positions >= 0).view(b, h, count, self.page)
        paged_pos = positions.view(b, h, count, self.page)
        big = torch.iinfo(torch.int64).max
        first = paged_pos.masked_fill(~real, big).amin(dim=-1)
        last = paged_pos.amax(dim=-1)  # padding is -1, so a page without real entries reads -1
        first = first.masked_fill(last < 0, -1)
        empty = (last < 0)[..., None]
        for key_map in maps:
            # rotate each (row, head) at its own positions: fold heads into the batch
            rotated = rotate(keys.reshape(b * h, 1, t, d), key_map(positions.reshape(b * h, t)), table)
            rotated = rotated.view(b, h, count, self.page, d)
            low = rotated.masked_fill(~real[..., None], math.inf).amin(dim=3).masked_fill(empty, 0)
            high = rotated.masked_fill(~real[..., None], -math.inf).amax(dim=3).masked_fill(empty, 0)
            # the kept pages' bounds are final; the copy is 1/page of what appending to the entries copies
            self.low[key_map] = _replace_tail(self.low.get(key_map), start, low)
            self.high[key_map] = _replace_tail(self.high.get(key_map), start, high)
        # int32 like the entries' positions
        self.first = _replace_tail(self.first, start, first.to(torch.int32))
        self.last = _replace_tail(self.last, start, last.to(torch.int32))
        self.summarized = n

    def keep(self, mask: torch.Tensor) -> None:
        # only a layer's own sliding window evicts from a paged cache; the pages restart from its new
        # first entry, so every bound is recomputed at the next call
        super().keep(mask)
        self.reset_pages()

    def select(self, batch_indices: torch.Tensor) -> None:
        super().select(batch_indices)
        rows = batch_indices.to(self.lengths.device)
        for bounds in (self.low, self.high):
            for key_map, value in bounds.items():
                bounds[key_map] = value[rows]
        if self.first is not None:
            self.first, self.last = self.first[rows], self.last[rows]


def _same_table(a: FrequencyTable, b: FrequencyTable | None) -> bool:
    if b is None or a.attention_factor != b.attention_factor:
        return False
    return a.inv_freq is b.inv_freq or torch.equal(a.inv_freq, b.inv_freq.to(a.inv_freq.device))


def _replace_tail(old: torch.Tensor | None, start: int, new: torch.Tensor) -> torch.Tensor:
    """Pages [0, start) of ``old`` followed by ``new`` (pages on dim 2)."""
    if old is None or start == 0:
        return new
    return torch.cat((old[:, :, :start], new), dim=2)


def key_maps(segments: tuple[Segment, ...]) -> tuple[PositionMap, ...]:
    """The distinct key maps of a position method's segments, in order."""
    return tuple(dict.fromkeys(s.key_map for s in segments))


def admitted(segment: Segment, q_pos: torch.Tensor, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Pages (B, H, P) that may hold a key ``segment`` admits for the query at q_pos (B,).

    Interval tests on each page's first and last position: exact for each of the distance range, the
    key limit and the chunk lag alone when the page's positions are consecutive (a page's entries are
    consecutive tokens); when a segment combines a key limit with a distance range the test may also
    admit a page where no single key meets both — a superset, so the bound stays an upper bound."""
    q = q_pos.long()[:, None, None]
    first, last = first.long(), last.long()
    near, far = q - last, q - first  # the smallest and largest distance to the page's keys
    ok = (last >= 0) & (far >= max(segment.min_distance, 0)) & (near < segment.max_distance)
    if segment.key_limit is not None:
        ok &= first < segment.key_limit
    if segment.chunk is not None:
        lag_near = chunk_of(q, segment.chunk) - chunk_of(last, segment.chunk)
        lag_far = chunk_of(q, segment.chunk) - chunk_of(first, segment.chunk)
        ok &= (lag_far >= segment.min_chunk_lag) & (lag_near < segment.max_chunk_lag)
    return ok


def criticality(q: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Quest's upper bound (Tang et al., 2024, section 3.3 and figure 5) of q . k over a page's keys:
    sum_i max(q_i m_i, q_i M_i), for rotated queries q (B, Hq, d) and page bounds m = low, M = high
    (B, Hk, P, d); summed over the query heads sharing a KV head (GQA): (B, Hk, P).

    Since M >= m, max(q_i m_i, q_i M_i) = max(q_i, 0) M_i + min(q_i, 0) m_i: two matrix products."""
    b, hq, d = q.shape
    hk = low.shape[1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    grouped = q.to(dtype).view(b, hk, hq // hk, d).transpose(-1, -2)  # (B, Hk, d, G)
    bound = high.to(dtype) @ grouped.clamp(min=0) + low.to(dtype) @ grouped.clamp(max=0)
    return bound.sum(dim=-1)


def page_bounds(
    store: PagedEntries, q: torch.Tensor, q_pos: torch.Tensor, segments: tuple[Segment, ...], table: FrequencyTable
) -> torch.Tensor:
    """Upper bound (B, Hk, P) of the logits (without the softmax scale) a decoding query q (B, Hq, d)
    at q_pos (B,) gives each page's keys: per segment, the query rotated at its query map against the
    page's bounds at the segment's key map; the page's bound is the largest over the segments that may
    admit one of its keys (-inf for a page no segment admits)."""
    best = None
    for segment in segments:
        q_rot = rotate(q[:, :, None], segment.query_map(q_pos[:, None]), table)[:, :, 0]
        bound = criticality(q_rot, store.low[segment.key_map], store.high[segment.key_map])
        bound = bound.masked_fill(~admitted(segment, q_pos, store.first, store.last), -math.inf)
        best = bound if best is None else torch.maximum(best, bound)
    return best


def choose_pages(bounds: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` pages (B, H, count) of highest bound, in page order; the newest page — which holds
    the query's own token — is always one of them (Quest's kernel always reads the page being filled)."""
    bounds = bounds.clone()
    bounds[..., -1] = math.inf
    return torch.topk(bounds, count, dim=-1).indices.sort(dim=-1).values


def page_entries(pages: torch.Tensor, page: int, n: int) -> torch.Tensor:
    """Entry indices (B, H, M) of the chosen pages (B, H, count), in order. The newest page, always
    chosen and so always last, may be partial: its missing entries are left out (every row holds the
    same n entries, so M is the same for all)."""
    index = (pages[..., None] * page + torch.arange(page, device=pages.device)).flatten(-2)
    return index[..., : index.shape[-1] - (pages.shape[-1] * page - _entries_in(pages.shape[-1], page, n))]


def _entries_in(count: int, page: int, n: int) -> int:
    """Entries in ``count`` chosen pages of n entries, the newest (partial) page among them."""
    return (count - 1) * page + n - (math.ceil(n / page) - 1) * page
