"""Sparse attention over a selection of keys per query block, through the segmented kernel's parts.

A prefill method says, for each block of queries, which keys the block may read (a boolean mask over
the keys up to the block's last query). For each block this module gathers those keys (per query
head: patterns differ by head), and, for every segment of the active position method (docs/design.md
"Segments merged by log-sum-exp"), rotates the block's queries and the gathered keys at the
segment's positions, asks the device's attention backend for ``(out, lse)`` with a mask built from
``Segment.admits`` (causality, distance range, key limit, chunk lag) and merges the pieces by
log-sum-exp. Only block-sized temporaries exist: (heads x block x selected keys), never (L x L).

Query blocks are aligned to the end of the queries and key tiles to the end of the keys, like the
kernel's plan, so in prefill each block's diagonal tile is exactly its square.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from longlab.attention.backends import backend_for
from longlab.attention.kernel import accumulator_dtype, check_same_device
from longlab.attention.merge import merge_into
from longlab.errors import LonglabError
from longlab.positions.rope import FrequencyTable, rotate
from longlab.positions.segments import Segment


@dataclass(frozen=True)
class Grid:
    """Query blocks and key tiles of one size, both aligned to the end of their sequence."""

    size: int
    q_len: int
    k_len: int

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.q_len / self.size)

    @property
    def n_tiles(self) -> int:
        return math.ceil(self.k_len / self.size)

    @property
    def key_pad(self) -> int:
        """Keys missing at the front of the first tile."""
        return self.n_tiles * self.size - self.k_len

    def block(self, i: int) -> tuple[int, int]:
        stop = self.q_len - (self.n_blocks - 1 - i) * self.size
        return max(0, stop - self.size), stop

    def tile_keys(self, tiles: torch.Tensor, stop: int) -> torch.Tensor:
        """(..., n_tiles) bool over tiles -> (..., stop) bool over the keys [0, stop)."""
        keys = tiles.repeat_interleave(self.size, dim=-1)
        return keys[..., self.key_pad : self.key_pad + stop]


class Selection:
    """Which keys each query block reads. ``grid`` fixes the blocks; :meth:`keys` answers per block."""

    grid: Grid

    def keys(self, block: int, stop: int) -> torch.Tensor:
        """(B, Hq, stop) bool: the keys among [0, stop) that query block ``block`` may read
        (causality and the position method's segments cut further)."""
        raise NotImplementedError


def check_no_grad(name: str, *tensors: torch.Tensor) -> None:
    """Sparse prefill is forward-only: refuse, with advice, a call autograd would differentiate."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise LonglabError(
            f"sparse prefill ({name}) has no backward pass: run it under torch.no_grad() / inference_mode, "
            "or drop the prefill method for training"
        )


def gather_keys(allowed: torch.Tensor, k_rot: torch.Tensor, v: torch.Tensor, k_pos: torch.Tensor):
    """Compact the keys a block reads: allowed (B, Hq, N) bool over keys [0, N) of the contiguous
    k_rot, v (B, Hk, T, d), T >= N
    -> (keys, values (B * Hq, 1, n, d), positions (B, Hq, n), real (B, Hq, n) bool), n the largest count
    over heads; slots past a head's own count are padding (``real`` False). Rows are copied with one
    ``index_select`` each (far cheaper than advanced indexing with three index tensors)."""
    b, hq, n_keys = allowed.shape
    hk, length, dim = k_rot.shape[1:]
    counts = allowed.sum(dim=-1)
    n = int(counts.max())
    slot = allowed.long().cumsum(dim=-1) - 1
    slot = torch.where(allowed, slot, n)  # unselected keys all land in one spare column, dropped below
    index = torch.zeros(b, hq, n + 1, dtype=torch.long, device=k_rot.device)
    index.scatter_(2, slot, torch.arange(n_keys, device=k_rot.device).expand(b, hq, n_keys))
    index = index[..., :n]
    real = torch.arange(n, device=k_rot.device) < counts[..., None]
    # row of key j of query head h in the flattened (B * Hk * N, d) keys: ((b * Hk) + h // G) * N + j
    rows = torch.arange(b, device=k_rot.device)[:, None] * hk + torch.arange(hq, device=k_rot.device) // (hq // hk)
    flat = (rows[..., None] * length + index).reshape(-1)
    keys = k_rot.reshape(-1, dim).index_select(0, flat).view(b * hq, 1, n, dim)
    values = v.reshape(-1, dim).index_select(0, flat).view(b * hq, 1, n, dim)
    return keys, values, k_pos.gather(1, index.reshape(b, -1)).view(b, hq, n), real


def _mode(segment: Segment, q_pos: torch.Tensor, k_pos: torch.Tensor) -> str:
    """ "skip", "full" or "mask" for a segment over these queries and keys, from their extreme positions
    (like the kernel's plan): a full piece needs no mask beyond padding slots."""
    if k_pos.numel() == 0:
        return "skip"
    bounds = torch.stack((q_pos.min() - k_pos.max(), q_pos.max() - k_pos.min())).tolist()  # one host copy
    lo, hi = max(segment.min_distance, 0), segment.max_distance
    if bounds[1] < lo or bounds[0] >= hi:
        return "skip"
    return "full" if segment.by_distance and bounds[0] >= lo and bounds[1] < hi else "mask"


def _piece(backend, q_rot, keys, values, scale, admitted, real):
    """(out, lse) of one piece with rows that see no key set to (0, -inf). ``admitted`` (B', 1|H, M, n)
    bool or None (every pair); ``real`` (B', 1, 1, n) bool, False for padding slots, or None."""
    b, _, m, _ = q_rot.shape
    n = keys.shape[2]
    seen = admitted if real is None else (real if admitted is None else admitted & real)
    if seen is None:
        return backend.forward(q_rot, keys, values, scale, False, None)
    mask = torch.zeros(seen.shape, dtype=q_rot.dtype, device=q_rot.device).masked_fill_(~seen, -math.inf)
    out, lse = backend.forward(q_rot, keys, values, scale, False, mask.expand(b, 1, m, n))
    seen = seen.any(dim=-1)  # fully masked rows: each op returns its own value (0, NaN, ...)
    lse = lse.masked_fill(~seen, -math.inf)
    out = out.masked_fill(~seen[..., None], 0.0)
    return out, lse


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    segments: Sequence[Segment],
    table: FrequencyTable,
    scale: float,
    selection: Selection,
    key_valid: torch.Tensor | None = None,
    name: str = "sparse",
) -> torch.Tensor:
    """Attention of q (B, Hq, Tq, d) over the selected keys of k, v (B, Hk, Tk, d): query i of block
    b sees key j when ``selection.keys(b, ...)[j]``, the key is valid, and a segment admits the pair
    (causal by position). Same arguments as :func:`longlab.attention.kernel.segmented_attention`;
    the queries are the last Tq keys. Rows that see no key return zeros. Forward only.

    Each block's keys come in two parts: the earlier keys it selected, gathered per query head, and
    its own diagonal square, read whole (every method keeps it: local attention), GQA-native. Keys are
    rotated once per segment; each piece is one backend call, merged by log-sum-exp."""
    check_same_device(q=q, k=k, v=v, q_pos=q_pos, k_pos=k_pos, key_valid=key_valid)
    check_no_grad(name, q, k, v)
    b, hq, tq, dim = q.shape
    tk = k.shape[2]
    q_pos, k_pos = q_pos.expand(b, tq), k_pos.expand(b, tk)
    backend = backend_for(q.device, q.dtype, dim)
    acc_dtype = accumulator_dtype(q.dtype)
    grid, offset = selection.grid, tk - tq
    k_rots = [rotate(k, segment.key_map(k_pos), table) for segment in segments]  # O(L d) each, once
    v = v.contiguous()
    out = torch.empty_like(q)
    for i in range(grid.n_blocks):
        a, z = grid.block(i)
        m, first = z - a, offset + a  # keys [first, offset + z) are the block's diagonal square
        acc = torch.zeros(b, hq, m, dim, dtype=acc_dtype, device=q.device)
        lse = torch.full((b, hq, m), -math.inf, dtype=acc_dtype, device=q.device)
        block_pos = q_pos[:, a:z]
        past = selection.keys(i, first)
        if key_valid is not None:
            past = past & key_valid[:, None, :first]
        square_valid = None if key_valid is None else key_valid[:, None, None, first : offset + z]
        for segment, k_rot in zip(segments, k_rots, strict=True):
            q_rot = rotate(q[:, :, a:z], segment.query_map(block_pos), table)
            pieces = []
            if first > 0 and bool(past.any()):
                keys, values, positions, real = gather_keys(past, k_rot, v, k_pos)
                mode = _mode(segment, block_pos, positions[real])
                if mode != "skip":
                    padding = None if bool(real.all()) else real.view(b * hq, 1, 1, -1)
                    admitted = None
                    if mode == "mask":
                        admitted = segment.admits(block_pos[:, None], positions).view(b * hq, 1, m, -1)
                    flat_q = q_rot.reshape(b * hq, 1, m, dim)
                    pieces.append(_piece(backend, flat_q, keys, values, scale, admitted, padding))
            square_pos = k_pos[:, first : offset + z]
            admitted = segment.admits(block_pos, square_pos)[:, None]  # (B, 1, m, m): causality and the segment
            if square_valid is not None:
                admitted = admitted & square_valid
            if bool(admitted.any()):
                keys, values = k_rot[:, :, first : offset + z], v[:, :, first : offset + z]
                pieces.append(_piece(backend, q_rot, keys, values, scale, admitted, None))
            for piece, piece_lse in pieces:
                merge_into(acc, lse, piece.view(b, hq, m, dim).to(acc_dtype), piece_lse.view(b, hq, m).to(acc_dtype))
        out[:, :, a:z] = acc
    return out
