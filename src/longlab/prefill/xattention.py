"""``xattention``: XAttention's block-sparse prefill, blocks chosen by antidiagonal scores."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longlab.errors import SpecError
from longlab.method import check_range, register
from longlab.positions.rope import rotate
from longlab.prefill.base import PrefillMethod
from longlab.prefill.sparse import Grid, Selection

SLAB = 2**21  # strided logits per head scored at once (query blocks are taken in groups that fit)


@register
@dataclass(frozen=True)
class XAttention(PrefillMethod):
    """XAttention (Xu et al., 2025, "XAttention: Block Sparse Attention with Antidiagonal Scoring",
    arXiv 2503.16428, section 2.1 eq. 1-2 and section 2.2 eq. 3): the attention matrix is cut into
    ``block`` x ``block`` tiles; within each, the antidiagonal entries at stride ``stride`` (query
    rS + S - 1 - t with key cS + t, t < S) are summed — computed for all tiles at once as a product of
    queries and keys reshaped by stride — soft-maxed over each query row (logits scaled by 1/S, as in
    the authors' code) and summed per tile. Each query block keeps the fewest tiles, in decreasing
    score, whose cumulative score reaches ``threshold`` of its total (eq. 3), plus its diagonal tile and
    the first tile (kept in the authors' code). We chose XAttention over FlexPrefill for its single,
    exact selection rule (FlexPrefill adds a per-head choice between query-aware and vertical-slash
    patterns from a JS-divergence test). Under a position method with several segments, a strided
    entry takes the logit of the segment admitting its pair (row's last query, column's first key).

    Defaults are the paper's (block 128, stride 8, threshold 0.9); ``threshold=1`` keeps every tile:
    the method is then dense attention exactly."""

    name = "xattention"
    threshold: float = 0.9
    stride: int = 8
    block: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self.name, "threshold", self.threshold, low=0.0, high=1.0, low_open=True)
        check_range(self.name, "stride", self.stride, low=1, integer=True)
        check_range(self.name, "block", self.block, low=1, integer=True)
        if self.block % self.stride:
            raise SpecError(
                f"{self.name}: parameter 'block' must be a multiple of 'stride' ({self.stride}), got {self.block}"
            )

    def full(self, k_len: int) -> bool:
        return self.threshold >= 1.0

    def block_scores(self, q, k, q_pos, k_pos, key_valid, segments, table, scale) -> torch.Tensor:
        """(B, Hq, n_blocks, n_tiles) float32: each query block's antidiagonal softmax mass per key tile
        (each strided row's probabilities sum to 1 over the tiles)."""
        b, hq, tq, dim = q.shape
        hk, tk = k.shape[1], k.shape[2]
        grid, s = Grid(self.block, tq, tk), self.stride
        q_pad, k_pad = grid.n_blocks * self.block - tq, grid.key_pad
        # zero queries/keys in front so that both sequences are whole tiles (their positions continue
        # backwards; padding columns are excluded, padding rows give nothing)
        qs, ks = F.pad(q.float(), (0, 0, q_pad, 0)), F.pad(k.float(), (0, 0, k_pad, 0))
        qp = torch.cat((q_pos[:, :1] - torch.arange(q_pad, 0, -1, device=q.device), q_pos), dim=1)
        kp = torch.cat((k_pos[:, :1] - torch.arange(k_pad, 0, -1, device=k.device), k_pos), dim=1)
        valid = torch.ones(b, tk, dtype=torch.bool, device=k.device) if key_valid is None else key_valid
        valid = F.pad(valid, (k_pad, 0), value=False)
        rows, cols = qs.shape[2] // s, ks.shape[2] // s
        row_pos = qp[:, s - 1 :: s]  # each strided row's last query
        col_pos = kp[:, ::s]  # each strided column's first key
        col_valid = valid.view(b, cols, s).any(dim=-1)
        strided = []
        for segment in segments:
            q_rot = rotate(qs, segment.query_map(qp), table).view(b, hk, hq // hk, rows, s, dim)
            k_rot = rotate(ks, segment.key_map(kp), table).view(b, hk, cols, s * dim)
            strided.append((segment, q_rot.flip(4).reshape(b, hk, hq // hk, rows, s * dim), k_rot))
        per_block = self.block // s
        scores = torch.zeros(b, hq, grid.n_blocks, grid.n_tiles, dtype=torch.float32, device=q.device)
        group = max(1, SLAB // (per_block * cols))
        for first in range(0, grid.n_blocks, group):
            last = min(first + group, grid.n_blocks)
            r0, r1 = first * per_block, last * per_block
            logits = torch.full((b, hk, hq // hk, r1 - r0, cols), -torch.inf, device=q.device)
            for segment, q_rot, k_rot in strided:
                admitted = segment.admits(row_pos[:, r0:r1], col_pos) & col_valid[:, None, :]
                piece = torch.einsum("bhgrd,bhcd->bhgrc", q_rot[:, :, :, r0:r1], k_rot) * (scale / s)
                logits = torch.where(admitted[:, None, None], piece, logits)
            probabilities = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
            mass = probabilities.view(b, hq, last - first, per_block, grid.n_tiles, per_block).sum(dim=(3, 5))
            scores[:, :, first:last] = mass
        return scores

    def select(self, q, k, q_pos, k_pos, key_valid, segments, table, scale) -> Selection:
        scores = self.block_scores(q, k, q_pos, k_pos, key_valid, segments, table, scale)
        return Blocks(Grid(self.block, q.shape[2], k.shape[2]), keep_tiles(scores, self.threshold))


def keep_tiles(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, H, n_blocks, n_tiles) bool: per query block, the highest-scoring tiles until their cumulative
    score reaches ``threshold`` of the block's total (XAttention eq. 3), plus the diagonal and first tiles."""
    n_blocks, n_tiles = scores.shape[-2:]
    ordered, order = scores.sort(dim=-1, descending=True)
    before = ordered.cumsum(dim=-1) - ordered  # mass of the tiles ranked above each one
    needed = before < threshold * scores.sum(dim=-1, keepdim=True)
    keep = torch.zeros_like(needed).scatter_(-1, order, needed)
    blocks = torch.arange(n_blocks, device=scores.device)
    keep[..., blocks, blocks + n_tiles - n_blocks] = True  # the diagonal tile
    keep[..., 0] = True
    return keep


class Blocks(Selection):
    """Kept key tiles per (batch row, head, query block)."""

    def __init__(self, grid: Grid, tiles: torch.Tensor) -> None:
        self.grid, self.tiles = grid, tiles

    def keys(self, block: int, stop: int) -> torch.Tensor:
        return self.grid.tile_keys(self.tiles[:, :, block], stop)
