"""Segments of a contiguous sequence as bands of the (query, key) index grid: few, large, unmasked calls.

When a call has no padding and positions run contiguously (position = index + a constant per row,
the queries being the last keys), a segment admitting distances ``lo <= d < hi`` is, in index
space, the band of keys ``[i - hi + 1, i - lo]`` of query i — a causal triangle shifted by ``lo``,
cut by a sliding window of ``hi - lo`` keys. A GPU backend answers such a band in one call without
any mask (FlashAttention-2's bottom-right causality and window), or, when the band is unbounded,
as one rectangle of keys every query sees plus one causal square (cuDNN, the fastest op there).
Queries are taken in chunks of rows so that buffers stay a fraction of the output.

The pieces of all segments cover each admitted (query, key) pair exactly once, like the blockwise
plan (:mod:`.plan`) they replace for such calls; both merge by log-sum-exp and share the backward
decomposition.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from longlab.positions.segments import Segment

ROWS = 32768  # query rows per chunk: few calls and merges; buffers a fraction of the output beyond 32k
SMALL = 64  # fewer query rows than this go to the band op whole (decoding, short tails)

FULL, CAUSAL, BAND = "full", "causal", "band"


@dataclass(frozen=True)
class Piece:
    """Queries [a, z) over keys [start, stop) of one segment.

    ``full``: every query sees every key; ``causal``: a square where query r sees keys <= r;
    ``band``: query r sees keys up to its bottom-right aligned diagonal, at most ``window`` behind
    it (None: no limit).
    """

    segment: int
    a: int
    z: int
    start: int
    stop: int
    kind: str
    window: int | None = None


def is_contiguous(q_pos: torch.Tensor, k_pos: torch.Tensor, key_valid: torch.Tensor | None) -> bool:
    """True when every row's positions are its indices plus a constant and the queries are the
    last keys, with no padding: then distances are index differences."""
    if key_valid is not None:
        return False
    tq, tk = q_pos.shape[1], k_pos.shape[1]
    steps = torch.arange(tk, device=k_pos.device)
    ok = (k_pos - k_pos[:, :1] == steps).all() & (q_pos == k_pos[:, tk - tq :]).all()
    return bool(ok)


def pieces(tq: int, tk: int, segments: Sequence[Segment]) -> list[Piece]:
    """The pieces of every segment, query chunk by query chunk (positions contiguous, no padding)."""
    offset, rows = tk - tq, ROWS  # query r is key offset + r
    out = []
    for chunk_start in range(0, tq, rows):
        chunk_stop = min(chunk_start + rows, tq)
        for index, segment in enumerate(segments):
            lo, hi = segment.min_distance, segment.max_distance
            a = max(chunk_start, lo - offset)  # earlier queries have no key `lo` behind them
            z = chunk_stop
            if a >= z:
                continue
            stop = offset + z - lo  # the last query's newest admitted key, exclusive
            if math.isinf(hi):
                if z - a <= SMALL:
                    out.append(Piece(index, a, z, 0, stop, BAND))
                    continue
                square = stop - (z - a)  # keys before the square are seen by every query
                if square > 0:
                    out.append(Piece(index, a, z, 0, square, FULL))
                out.append(Piece(index, a, z, square, stop, CAUSAL))
            else:
                window = int(hi) - lo - 1
                start = max(0, offset + a - window - lo)
                out.append(Piece(index, a, z, start, stop, BAND, window))
    return out
