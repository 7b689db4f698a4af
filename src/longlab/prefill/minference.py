"""``minference``: MInference's vertical-slash sparse prefill, estimated per head from the last queries."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longlab.cache.scores import attention_blocks
from longlab.method import check_range, register
from longlab.prefill.base import PrefillMethod
from longlab.prefill.sparse import Grid, Selection

SINK_KEYS = 30  # verticals always kept: the first keys (attention sinks), as in the authors' code
LOCAL_OFFSETS = 100  # slashes always kept: the nearest diagonals (local window), as in the authors' code


@register
@dataclass(frozen=True)
class MInference(PrefillMethod):
    """MInference (Jiang et al., 2024, "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs
    via Dynamic Sparse Attention", arXiv 2407.02490, section 3.2 and algorithm 2, the vertical-slash
    pattern): per head, the last ``last_q`` queries' attention to all keys (under the active position
    method's segments) is summed per key (vertical score) and per diagonal offset i - j (slash score);
    the top ``vertical`` keys and top ``slash`` offsets are kept, the first 30 keys and the 100 nearest
    offsets always (within those budgets, nearest first: the diagonal is always kept), as in the
    authors' code. Like the paper's kernel, slash lines are computed at block granularity: query block
    [a, z) (``block`` queries) reads, for each kept slash o, the whole key range [a - o, z - o) the line
    crosses in its rows, plus the kept vertical keys, causally.

    The paper searches offline, per head, among three pattern types (A-shape, vertical-slash,
    block-sparse); longlab uses vertical-slash for every head (the pattern most heads of the paper's
    models got), so no offline search is needed. Defaults are the paper's for LLaMA-3-8B-1M
    (vertical 1000, slash 6096, last_q 64, block 64). ``vertical`` >= the key count selects everything:
    the method is then dense attention exactly."""

    name = "minference"
    vertical: int = 1000
    slash: int = 6096
    last_q: int = 64
    block: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self.name, "vertical", self.vertical, low=1, integer=True)
        check_range(self.name, "slash", self.slash, low=1, integer=True)
        check_range(self.name, "last_q", self.last_q, low=1, integer=True)
        check_range(self.name, "block", self.block, low=1, integer=True)

    def full(self, k_len: int) -> bool:
        return self.vertical >= k_len

    def estimate(self, q, k, q_pos, k_pos, key_valid, segments, table, scale) -> tuple[torch.Tensor, torch.Tensor]:
        """(vertical key indices (B, Hq, nv), slash offsets (B, Hq, ns)) from the last queries.

        An offset is counted in key indices: query row r (key index Tk - Tq + r) and key j lie on
        slash o = Tk - Tq + r - j."""
        b, hq, tq, dim = q.shape
        hk, tk = k.shape[1], k.shape[2]
        last = min(self.last_q, tq)
        if key_valid is None:
            key_valid = torch.ones(b, tk, dtype=torch.bool, device=k.device)
        grouped = q[:, :, tq - last :].reshape(b, hk, hq // hk, last, dim)
        per_head = (b, hk)
        (_, _, probabilities), *_ = attention_blocks(
            grouped, k, q_pos[:, None, tq - last :].expand(*per_head, last), k_pos[:, None].expand(*per_head, tk),
            key_valid[:, None].expand(*per_head, tk), segments, table, scale, block=last,
        )  # fmt: skip
        probabilities = probabilities.reshape(b, hq, last, tk)
        vertical = probabilities.sum(dim=2)
        rows = torch.arange(tk - last, tk, device=k.device)[:, None]
        offsets = rows - torch.arange(tk, device=k.device)[None, :]  # (last, Tk); negative: after the query
        future = offsets < 0
        slash = torch.zeros(b, hq, tk, dtype=probabilities.dtype, device=k.device)
        slash.scatter_add_(
            2,
            offsets.clamp(min=0).reshape(1, 1, -1).expand(b, hq, -1),
            probabilities.masked_fill(future, 0.0).reshape(b, hq, -1),
        )
        # forced lines rank above any score (a sum over `last` rows is at most `last`), the first keys
        # and the nearest offsets first: offset 0, the block's own diagonal, is always kept
        vertical[..., :SINK_KEYS] = last + torch.arange(min(SINK_KEYS, tk), 0, -1, device=k.device)
        slash[..., :LOCAL_OFFSETS] = last + torch.arange(min(LOCAL_OFFSETS, tk), 0, -1, device=k.device)
        return vertical.topk(min(self.vertical, tk), dim=-1).indices, slash.topk(min(self.slash, tk), dim=-1).indices

    def select(self, q, k, q_pos, k_pos, key_valid, segments, table, scale) -> Selection:
        verticals, slashes = self.estimate(q, k, q_pos, k_pos, key_valid, segments, table, scale)
        return VerticalSlash(Grid(self.block, q.shape[2], k.shape[2]), verticals, slashes)


class VerticalSlash(Selection):
    """Kept vertical keys and slash offsets per head, read at the grid's block granularity."""

    def __init__(self, grid: Grid, verticals: torch.Tensor, slashes: torch.Tensor) -> None:
        self.grid, self.verticals, self.slashes = grid, verticals, slashes

    def keys(self, block: int, stop: int) -> torch.Tensor:
        grid = self.grid
        a, z = grid.block(block)
        offset = grid.k_len - grid.q_len
        b, hq, _ = self.verticals.shape
        device = self.verticals.device
        # Slash o crosses keys [offset + a - o, offset + z - o) in this block's rows: mark each range's
        # start with +1 and its end with -1; a key is read where the running sum is positive.
        starts = (offset + a - self.slashes).clamp(min=0, max=stop)
        ends = (offset + z - self.slashes).clamp(min=0, max=stop)
        edges = torch.zeros(b, hq, stop + 1, dtype=torch.int32, device=device)
        ones = torch.ones(starts.shape, dtype=torch.int32, device=device)
        edges.scatter_add_(2, starts, ones).scatter_add_(2, ends, -ones)
        allowed = edges.cumsum(dim=-1) > 0
        return allowed.scatter_(2, torch.where(self.verticals < stop, self.verticals, stop), True)[..., :stop]
