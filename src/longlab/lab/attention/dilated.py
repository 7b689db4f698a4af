"""``dilated``: a sliding window with gaps — query i sees keys i, i - d, i - 2d, ... (window keys)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longlab.errors import SpecError
from longlab.lab.attention.base import AttentionModule, LabAttention
from longlab.lab.attention.sparse import SparseAttention, block_sparse_attention, query_positions
from longlab.lab.positions.base import ModelShape
from longlab.lab.registry import register
from longlab.method import check_range


@register
@dataclass(frozen=True)
class Dilated(LabAttention):
    """Dilated sliding window (Beltagy et al., 2020, "Longformer: The Long-Document Transformer",
    §3.1 "Dilated Sliding Window"; Child et al., 2019, "Generating Long Sequences with Sparse
    Transformers", §4.2 strided pattern): query i attends keys j = i - m * dilation for
    0 <= m < window (and j >= 0), so ``window`` keys reach (window - 1) * dilation back;
    ``dilation=1`` is ``sliding:window``. Longformer mixes dilations across heads so some heads stay
    local (§3.1; its language model, §4.2, dilates "only 2 heads"): the last ``dilated_heads`` heads
    use ``dilation``, the others 1 (a model dilating every head never sees an odd distance, however
    deep). Memory O(T * (window + 15)) (:class:`DilatedAttention`).
    Defaults: 64 keys, as ``sliding``'s default, reaching 127 back on the 2 dilated heads."""

    name = "dilated"
    window: int = 64
    dilation: int = 2
    dilated_heads: int = 2

    def __post_init__(self) -> None:
        check_range(self.name, "window", self.window, low=1, integer=True)
        check_range(self.name, "dilation", self.dilation, low=1, integer=True)
        check_range(self.name, "dilated_heads", self.dilated_heads, low=0, integer=True)

    def build(self, shape: ModelShape, layer: int) -> AttentionModule:
        if self.dilated_heads > shape.heads:
            raise SpecError(
                f"{self.name}: parameter 'dilated_heads' must be an integer >= 0 and <= the model's "
                f"{shape.heads} heads, got {self.dilated_heads}"
            )
        local = shape.heads - self.dilated_heads
        dilations = [1] * local + [self.dilation] * self.dilated_heads
        return DilatedAttention(self.window, tuple(dilations))


class DilatedAttention(SparseAttention):
    """Runs on the block-sparse routine after a permutation: the positions i = c (mod d) form one
    contiguous run (their order kept), where the dilated window is a plain sliding window of
    ``window`` keys. Query blocks of 16 then gather window + 15 keys each instead of every query
    gathering its own ``window``: 16x fewer gathered keys. Heads of each dilation run separately."""

    block = 16

    def __init__(self, window: int, dilations: tuple[int, ...]):
        super().__init__()
        self.window, self.dilations = window, dilations

    def pattern(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The pattern in position coordinates, one query per block (for dense baselines and checks)."""
        per_head = self.dilations if len(set(self.dilations)) > 1 else self.dilations[:1]
        dilation = torch.tensor(per_head, device=device).view(-1, 1, 1)
        steps = torch.arange(self.window, device=device)
        index = torch.arange(length, device=device).view(1, -1, 1) - steps * dilation  # (G, T, window)
        allowed = torch.ones(index.shape[0], length, 1, self.window, dtype=torch.bool, device=device)
        return index, allowed

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        outs, first = [], 0
        for dilation in dict.fromkeys(self.dilations):  # the distinct dilations, in head order
            count = self.dilations.count(dilation)
            heads = slice(first, first + count)
            outs.append(self._dilated(q[:, heads], k[:, heads], v[:, heads], dilation))
            first += count
        return torch.cat(outs, dim=1)

    def _dilated(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dilation: int) -> torch.Tensor:
        t = q.shape[2]
        runs = -(-t // dilation)  # length of each residue class's run, padded at its end

        def by_class(x: torch.Tensor) -> torch.Tensor:  # position s * d + c -> c * runs + s
            return F.pad(x, (0, 0, 0, runs * dilation - t)).unflatten(2, (runs, dilation)).transpose(2, 3).flatten(2, 3)

        length = runs * dilation
        blocks = -(-length // self.block)
        i = query_positions(blocks, self.block, q.device)
        index = i[:, :1] - self.window + 1 + torch.arange(self.window + self.block - 1, device=q.device)
        j, i = index[:, None, :], i[:, :, None]
        # same class (padding sits after a class's real positions, so causality keeps it out)
        allowed = (j // runs == i // runs) & (j <= i) & (i - j < self.window)
        out = block_sparse_attention(by_class(q), by_class(k), by_class(v), index[None], allowed[None], self.block)
        return out.unflatten(2, (dilation, runs)).transpose(2, 3).flatten(2, 3)[:, :, :t]
