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

    def tile_of(self, key_index: torch.Tensor) -> torch.Tensor:
        return torch.div(key_index + self.key_pad, self.size, rounding_mode="floor")

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


def gather_keys(allowed: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pos: torch.Tensor):
    """Compact the keys a block reads: allowed (B, Hq, N) bool over keys [0, N) ->
    (keys (B, Hq, n, d), values, positions (B, Hq, n), real (B, Hq, n) bool), n the largest count
    over heads; slots past a head's own count are padding (``real`` False)."""
    b, hq, n_keys = allowed.shape
    hk = k.shape[1]
    counts = allowed.sum(dim=-1)
    n = int(counts.max())
    slot = allowed.long().cumsum(dim=-1) - 1
    slot = torch.where(allowed, slot, n)  # unselected keys all land in one spare column, dropped below
    index = torch.zeros(b, hq, n + 1, dtype=torch.long, device=k.device)
    index.scatter_(2, slot, torch.arange(n_keys, device=k.device).expand(b, hq, n_keys))
    index = index[..., :n]
    real = torch.arange(n, device=k.device) < counts[..., None]
    rows = torch.arange(b, device=k.device)[:, None, None]
    kv_heads = (torch.arange(hq, device=k.device) // (hq // hk))[None, :, None]
    return k[rows, kv_heads, index], v[rows, kv_heads, index], k_pos[rows, index], real


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
    the queries are the last Tq keys. Rows that see no key return zeros. Forward only."""
    check_same_device(q=q, k=k, v=v, q_pos=q_pos, k_pos=k_pos, key_valid=key_valid)
    check_no_grad(name, q, k, v)
    b, hq, tq, dim = q.shape
    tk = k.shape[2]
    q_pos, k_pos = q_pos.expand(b, tq), k_pos.expand(b, tk)
    backend = backend_for(q.device, q.dtype, dim)
    acc_dtype = accumulator_dtype(q.dtype)
    grid, offset = selection.grid, tk - tq
    out = torch.empty_like(q)
    for i in range(grid.n_blocks):
        a, z = grid.block(i)
        stop = offset + z  # keys after the block's last query are never visible
        allowed = selection.keys(i, stop)
        if key_valid is not None:
            allowed = allowed & key_valid[:, None, :stop]
        keys, values, positions, real = gather_keys(allowed, k[:, :, :stop], v[:, :, :stop], k_pos[:, :stop])
        m, n = z - a, keys.shape[2]
        flat = (b * hq, 1)
        values = values.reshape(*flat, n, dim)
        acc = torch.zeros(b, hq, m, dim, dtype=acc_dtype, device=q.device)
        lse = torch.full((b, hq, m), -math.inf, dtype=acc_dtype, device=q.device)
        for segment in segments:
            admitted = segment.admits(q_pos[:, None, a:z], positions) & real[:, :, None, :]  # (B, Hq, m, n)
            if n == 0 or not bool(admitted.any()):
                continue
            q_rot = rotate(q[:, :, a:z], segment.query_map(q_pos[:, a:z]), table)
            k_rot = rotate(keys.reshape(*flat, n, dim), segment.key_map(positions).reshape(b * hq, n), table)
            mask = None
            if not bool(admitted.all()):
                mask = torch.zeros(admitted.shape, dtype=q.dtype, device=q.device).masked_fill_(~admitted, -math.inf)
                mask = mask.view(b * hq, 1, m, n)
            piece, piece_lse = backend.forward(q_rot.reshape(*flat, m, dim), k_rot, values, scale, False, mask)
            piece, piece_lse = piece.view(b, hq, m, dim), piece_lse.view(b, hq, m)
            seen = admitted.any(dim=-1)  # fully masked rows: each op returns its own value (0, NaN, ...)
            piece_lse = piece_lse.masked_fill(~seen, -math.inf)
            piece = piece.masked_fill(~seen[..., None], 0.0)
            merge_into(acc, lse, piece.to(acc_dtype), piece_lse.to(acc_dtype))
        out[:, :, a:z] = acc
    return out
