"""``longformer``: a sliding window plus the first ``globals`` tokens, which every query sees."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longlab.lab.attention.base import AttentionModule, LabAttention
from longlab.lab.attention.sparse import SparseAttention, query_positions
from longlab.lab.positions.base import ModelShape
from longlab.lab.registry import register
from longlab.method import check_range


@register
@dataclass(frozen=True)
class Longformer(LabAttention):
    """Longformer's sliding window + global attention (Beltagy et al., 2020, "Longformer: The
    Long-Document Transformer", §3.1-3.2), causal: query i attends i - window < j <= i and the global
    tokens j < ``globals`` (j <= i). Global tokens are symmetric in the paper (they attend to every
    token and every token to them); causally a global token sees only what precedes it, which the
    window and the other global tokens already cover. Query blocks of 16 gather the global keys plus
    the window + 15 keys before each block: memory O(T * (window + globals))."""

    name = "longformer"
    window: int = 64
    globals: int = 4

    def __post_init__(self) -> None:
        check_range(self.name, "window", self.window, low=1, integer=True)
        check_range(self.name, "globals", self.globals, low=0, integer=True)

    def build(self, shape: ModelShape, layer: int) -> AttentionModule:
        return LongformerAttention(self.window, self.globals)


class LongformerAttention(SparseAttention):
    block = 16

    def __init__(self, window: int, globals: int):
        super().__init__()
        self.window, self.globals = window, globals

    def pattern(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = -(-length // self.block)
        i = query_positions(blocks, self.block, device)  # (n, block)
        start = i[:, :1] - self.window + 1  # the first key the block's first query sees
        local = start + torch.arange(self.window + self.block - 1, device=device)  # (n, window + block - 1)
        fixed = torch.arange(self.globals, device=device).expand(blocks, self.globals)
        index = torch.cat([fixed, local], dim=1)
        j, q = index[:, None, :], i[:, :, None]
        is_global = torch.arange(index.shape[1], device=device) < self.globals
        # a global key is listed once, in its global slot: its window slot is masked
        in_window = (q - self.window < j) & (j >= self.globals)
        allowed = (j <= q) & (is_global | in_window)
        return index[None], allowed[None]
