"""``blockwise``: each head attends one key block per query block (its own, or the one before)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longlab.errors import SpecError
from longlab.lab.attention.base import AttentionModule, LabAttention
from longlab.lab.attention.sparse import SparseAttention, query_positions
from longlab.lab.positions.base import ModelShape
from longlab.lab.registry import register
from longlab.method import check_range


@register
@dataclass(frozen=True)
class Blockwise(LabAttention):
    """Blockwise self-attention (Qiu et al., 2020, "Blockwise Self-Attention for Long Document
    Understanding" (BlockBERT), §3, blockwise multi-head attention): the sequence is cut into blocks
    of ``block`` tokens and each head keeps one key block per query block, block (i, pi(i)) for a
    permutation pi per head:
    the identity, or the shift by one block (the paper's permutations are shifts). Causal version
    (longlab's): the identity heads attend their own block causally; the last ``shifted_heads``
    heads attend the whole previous block, pi(i) = i - 1, and block 0 — whose shift would wrap round
    to the last block, the future — its own block causally. Memory O(T * block)."""

    name = "blockwise"
    block: int = 32
    shifted_heads: int = 2

    def __post_init__(self) -> None:
        check_range(self.name, "block", self.block, low=1, integer=True)
        check_range(self.name, "shifted_heads", self.shifted_heads, low=0, integer=True)

    def build(self, shape: ModelShape, layer: int) -> AttentionModule:
        if self.shifted_heads > shape.heads:
            raise SpecError(
                f"{self.name}: parameter 'shifted_heads' must be an integer >= 0 and <= the model's "
                f"{shape.heads} heads, got {self.shifted_heads}"
            )
        shifts = [0] * (shape.heads - self.shifted_heads) + [1] * self.shifted_heads
        return BlockwiseAttention(self.block, tuple(shifts))


class BlockwiseAttention(SparseAttention):
    def __init__(self, block: int, shifts: tuple[int, ...]):
        super().__init__()
        self.block, self.shifts = block, shifts

    def pattern(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = -(-length // self.block)
        shift = torch.tensor(self.shifts, device=device).view(-1, 1)
        query = torch.arange(blocks, device=device).view(1, -1)
        key_block = torch.where(query >= shift, query - shift, query)  # (H, n); block 0 keeps its own
        index = key_block[..., None] * self.block + torch.arange(self.block, device=device)  # (H, n, block)
        i = query_positions(blocks, self.block, device)
        return index, index[:, :, None, :] <= i[None, :, :, None]
