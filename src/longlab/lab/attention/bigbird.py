"""``bigbird``: block-sparse attention of sliding, global and random key blocks per query block."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longlab.lab.attention.base import AttentionModule, LabAttention
from longlab.lab.attention.sparse import SparseAttention, query_positions
from longlab.lab.positions.base import ModelShape
from longlab.lab.registry import register
from longlab.method import check_range

_MASK32 = 0xFFFFFFFF
_INELIGIBLE = 1 << 62


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two multiply-xorshift rounds) on int64 tensors: every product stays
    below 2^59, so it is exact on any device."""
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def random_blocks(
    seed: int,
    layer: int,
    heads: int,
    blocks: int,
    window_blocks: int,
    global_blocks: int,
    count: int,
    device: torch.device,
) -> torch.Tensor:
    """(heads, blocks, count) random key blocks of each query block, -1 where fewer are eligible.

    Query block n draws, without replacement, ``count`` of the key blocks that are neither global
    (< global_blocks) nor in its window (> n - window_blocks): the ones whose hash of (seed, layer,
    head, n, key block) is smallest. The hash depends on no length, so block n draws the same keys
    at every sequence length (training's blocks keep their pattern at 16x) and on every device."""
    head = torch.arange(heads, device=device).view(-1, 1, 1)
    query = torch.arange(blocks, device=device).view(1, -1, 1)
    key = torch.arange(blocks, device=device).view(1, 1, -1)
    h = _mix(_mix(_mix(torch.full((1, 1, 1), seed, device=device)) ^ layer) ^ 0x9E3779B9)
    h = _mix(_mix(_mix(h ^ head) ^ query) ^ key)
    eligible = (key >= global_blocks) & (key <= query - window_blocks)
    # the key block in the low bits breaks any tie, so the draw is one exact order on every device
    order = torch.where(eligible, (h << 20) | key, torch.full_like(h, _INELIGIBLE))
    picked = order.topk(min(count, blocks), dim=-1, largest=False).indices
    return torch.where(eligible.expand_as(order).gather(-1, picked), picked, torch.full_like(picked, -1))


@register
@dataclass(frozen=True)
class BigBird(LabAttention):
    """BigBird's block-sparse attention (Zaheer et al., 2020, "Big Bird: Transformers for Longer
    Sequences", §2 and Appendix D "blockified" ITC pattern), causal: the sequence is cut into blocks
    of ``block`` tokens; query block n attends key blocks n - window_blocks < m <= n (its own causally),
    the first ``global_blocks`` blocks, and ``random_blocks`` random blocks m <= n - window_blocks
    (outside the other two), fixed per (``seed``, layer, head, n) by a hash (:func:`random_blocks`):
    deterministic, the same at training and evaluation, and at lengths beyond training the new query
    blocks draw among all their earlier blocks. The global blocks attend causally (everything before
    them is global). Defaults scale the paper's 3 window / 2 global / 3 random blocks to the lab's
    length: block 8, so at most 64 keys per query, as ``sliding``'s default."""

    name = "bigbird"
    block: int = 8
    window_blocks: int = 3
    global_blocks: int = 2
    random_blocks: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        check_range(self.name, "block", self.block, low=1, integer=True)
        check_range(self.name, "window_blocks", self.window_blocks, low=1, integer=True)
        check_range(self.name, "global_blocks", self.global_blocks, low=0, integer=True)
        check_range(self.name, "random_blocks", self.random_blocks, low=0, integer=True)
        check_range(self.name, "seed", self.seed, low=0, high=_MASK32, integer=True)

    def build(self, shape: ModelShape, layer: int) -> AttentionModule:
        return BigBirdAttention(self, shape.heads, layer)


class BigBirdAttention(SparseAttention):
    def __init__(self, spec: BigBird, heads: int, layer: int):
        super().__init__()
        self.spec, self.heads, self.layer, self.block = spec, heads, layer, spec.block

    def random(self, blocks: int, device: torch.device) -> torch.Tensor:
        s = self.spec
        return random_blocks(
            s.seed, self.layer, self.heads, blocks, s.window_blocks, s.global_blocks, s.random_blocks, device
        )

    def pattern(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        s, blocks = self.spec, -(-length // self.block)
        query = torch.arange(blocks, device=device).view(-1, 1)
        window = query - torch.arange(s.window_blocks - 1, -1, -1, device=device)  # (n, window_blocks)
        window = torch.where(window >= s.global_blocks, window, torch.full_like(window, -1))  # listed as global
        fixed = torch.arange(s.global_blocks, device=device).expand(blocks, s.global_blocks)
        shared = torch.cat([fixed, window], dim=1).expand(self.heads, blocks, -1)
        key_blocks = torch.cat([shared, self.random(blocks, device)], dim=2)  # (H, n, blocks listed)
        offsets = torch.arange(self.block, device=device)
        index = (key_blocks[..., None] * self.block + offsets).flatten(2)  # (H, n, K)
        listed = (key_blocks >= 0)[..., None].expand(*key_blocks.shape, self.block).flatten(2)
        index = torch.where(listed, index, torch.full_like(index, -1))
        i = query_positions(blocks, self.block, device)
        allowed = index[:, :, None, :] <= i[None, :, :, None]
        return index, allowed
