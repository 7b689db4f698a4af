"""Plan a segmented attention call: which key ranges each query block reads, and how.

Queries are cut into blocks and keys into tiles of the same size, both aligned to the end of the
sequence so that in prefill each block's diagonal tile is exactly its square. For every
(segment, block, tile) the distance bounds decide one of:

- skip:   no query of the block can see any key of the tile under this segment;
- full:   every query sees every key: one kernel call, no mask;
- causal: the diagonal square where only causality cuts: the kernel's own ``is_causal``;
- mask:   anything else: an explicit additive mask of (block x run) built from positions.

A segment's key limit and chunk lags (Dual Chunk Attention) are bounded the same way, from the
block's and tile's extreme positions.

Consecutive tiles with the same mode become one run, so a long prefix costs one call per chunk.
Bounds are taken over all rows of the batch (conservative: a looser bound only turns "full" or
"skip" into "mask", which is still exact). The bounds are computed where the positions live and
copied to the host in one transfer: the plan is host-side scheduling, so everything after
:func:`make_layout` works on small CPU tensors (``device="cpu"`` on purpose).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longlab.positions.segments import Segment, chunk_of

SKIP, FULL, MASK, CAUSAL = 0, 1, 2, 3
_BIG = torch.iinfo(torch.int64).max // 4


@dataclass(frozen=True)
class Run:
    start: int  # key index, inclusive
    stop: int  # key index, exclusive
    mode: int


@dataclass
class Layout:
    """Block/tile geometry and position bounds of one call; shared by all its segments."""

    size: int  # block and tile size
    q_len: int
    k_len: int
    q_min: torch.Tensor  # (n_blocks,) smallest valid query position per block (_BIG when empty)
    q_max: torch.Tensor
    k_min: torch.Tensor  # (n_tiles,)
    k_max: torch.Tensor
    tile_all_valid: torch.Tensor  # (n_tiles,) bool
    tile_any_valid: torch.Tensor
    block_aligned: torch.Tensor  # (n_blocks,) diagonal tile holds the same positions as the block

    @property
    def n_blocks(self) -> int:
        return self.q_min.numel()

    @property
    def n_tiles(self) -> int:
        return self.k_min.numel()

    def block(self, i: int) -> tuple[int, int]:
        stop = self.q_len - (self.n_blocks - 1 - i) * self.size
        return max(0, stop - self.size), stop

    def tile(self, j: int) -> tuple[int, int]:
        stop = self.k_len - (self.n_tiles - 1 - j) * self.size
        return max(0, stop - self.size), stop

    def diagonal_tile(self, i: int) -> int:
        return self.n_tiles - self.n_blocks + i


def _tiles(x: torch.Tensor, size: int, fill: int | bool) -> torch.Tensor:
    """(B, T) -> (B, n, size), padded on the left so the last tile ends at T."""
    n = math.ceil(x.shape[1] / size)
    pad = n * size - x.shape[1]
    if pad:
        x = torch.cat((x.new_full((x.shape[0], pad), fill), x), dim=1)
    return x.view(x.shape[0], n, size)


def make_layout(q_pos: torch.Tensor, k_pos: torch.Tensor, key_valid: torch.Tensor | None, size: int) -> Layout:
    q_len, k_len = q_pos.shape[1], k_pos.shape[1]
    offset = k_len - q_len
    if key_valid is None:
        key_valid = torch.ones(k_pos.shape, dtype=torch.bool, device=k_pos.device)
    q_valid = key_valid[:, offset:]
    qv, qp = _tiles(q_valid, size, False), _tiles(q_pos, size, 0)
    kv, kp = _tiles(key_valid, size, False), _tiles(k_pos, size, 0)
    q_min = qp.masked_fill(~qv, _BIG).amin(dim=(0, 2))
    q_max = qp.masked_fill(~qv, -_BIG).amax(dim=(0, 2))
    k_min = kp.masked_fill(~kv, _BIG).amin(dim=(0, 2))
    k_max = kp.masked_fill(~kv, -_BIG).amax(dim=(0, 2))
    real = _tiles(torch.ones_like(key_valid), size, False)  # padding columns are not keys
    tile_all_valid = (kv | ~real).all(dim=2).all(dim=0)
    tile_any_valid = kv.any(dim=2).any(dim=0)
    same = (q_pos == k_pos[:, offset:]) & q_valid
    block_aligned = _tiles(same, size, True).all(dim=2).all(dim=0)
    # one device-to-host copy for all bounds (each .cpu() would be a synchronisation of its own)
    n_blocks, n_tiles = q_min.numel(), k_min.numel()
    host = torch.cat((q_min, q_max, block_aligned.long(), k_min, k_max, tile_all_valid.long(), tile_any_valid.long()))
    q_min, q_max, block_aligned, k_min, k_max, tile_all_valid, tile_any_valid = host.cpu().split(
        [n_blocks] * 3 + [n_tiles] * 4
    )
    block_aligned, tile_all_valid, tile_any_valid = block_aligned.bool(), tile_all_valid.bool(), tile_any_valid.bool()
    if q_len % size:  # the first block is short: its diagonal is no square
        block_aligned[0] = False
    return Layout(size, q_len, k_len, q_min, q_max, k_min, k_max, tile_all_valid, tile_any_valid, block_aligned)


def classify(layout: Layout, segment: Segment) -> torch.Tensor:
    """(n_blocks, n_tiles) int8 matrix of SKIP / FULL / MASK / CAUSAL for one segment."""
    lo, hi = max(segment.min_distance, 0), segment.max_distance
    d_lo = layout.q_min[:, None] - layout.k_max[None, :]
    d_hi = layout.q_max[:, None] - layout.k_min[None, :]
    empty = (layout.q_min[:, None] == _BIG) | ~layout.tile_any_valid[None, :]
    skip = empty | (d_hi < lo) | (d_lo >= hi)
    inside = (d_lo >= lo) & (d_hi < hi) & layout.tile_all_valid[None, :]
    if segment.key_limit is not None:
        skip |= (layout.k_min >= segment.key_limit)[None, :]
        inside &= (layout.k_max < segment.key_limit)[None, :]
    chunks_inside = None
    if segment.chunk is not None:  # chunk lags are monotone in the positions: bounds from the extremes
        lag_lo = chunk_of(layout.q_min, segment.chunk)[:, None] - chunk_of(layout.k_max, segment.chunk)[None, :]
        lag_hi = chunk_of(layout.q_max, segment.chunk)[:, None] - chunk_of(layout.k_min, segment.chunk)[None, :]
        skip |= (lag_hi < segment.min_chunk_lag) | (lag_lo >= segment.max_chunk_lag)
        chunks_inside = (lag_lo >= segment.min_chunk_lag) & (lag_hi < segment.max_chunk_lag)
        inside &= chunks_inside
    modes = torch.full(skip.shape, MASK, dtype=torch.int8, device="cpu")
    modes[inside] = FULL
    # The diagonal square is "causal" when only causality cuts it: the segment starts at distance 0,
    # reaches past the block, and the block's positions match its keys (no padding, no key limit, the
    # whole square in one admitted chunk lag).
    if lo == 0 and layout.n_tiles >= layout.n_blocks:
        rows = torch.arange(layout.n_blocks, device="cpu")
        cols = rows + layout.n_tiles - layout.n_blocks
        ok = layout.block_aligned & (d_hi[rows, cols] < hi) & layout.tile_all_valid[cols]
        if segment.key_limit is not None:
            ok &= layout.k_max[cols] < segment.key_limit
        if chunks_inside is not None:
            ok &= chunks_inside[rows, cols]
        ok &= modes[rows, cols] == MASK
        modes[rows[ok], cols[ok]] = CAUSAL
    modes[skip] = SKIP
    return modes


def runs(layout: Layout, modes_row: torch.Tensor, chunk_edges: torch.Tensor) -> list[Run]:
    """Group one block's tiles into runs of equal mode that never cross a chunk edge (tile indices)."""
    n = modes_row.numel()
    starts = torch.ones(n, dtype=torch.bool, device="cpu")
    starts[1:] = modes_row[1:] != modes_row[:-1]
    starts[chunk_edges] = True
    causal = modes_row == CAUSAL
    starts |= causal  # a causal square is always a run of its own
    starts[1:] |= causal[:-1]
    first = starts.nonzero().flatten().tolist()
    out = []
    for begin, end in zip(first, [*first[1:], n], strict=True):
        mode = int(modes_row[begin])
        if mode != SKIP:
            out.append(Run(layout.tile(begin)[0], layout.tile(end - 1)[1], mode))
    return out
