"""``rmt``: the Recurrent Memory Transformer — segments read and write a few memory tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from longlab.lab.attention.base import AttentionModule, LabAttention, Runner
from longlab.lab.attention.full import FullAttention
from longlab.lab.positions.base import ModelShape
from longlab.lab.registry import register
from longlab.method import check_range


@register
@dataclass(frozen=True)
class Rmt(LabAttention):
    """Recurrent Memory Transformer (Bulatov et al., 2022, "Recurrent Memory Transformer", NeurIPS,
    §3, decoder version): the sequence is cut into segments of ``segment`` tokens; segment t runs
    through every layer as [M_t; H_t; M_t] (read memory at the start, write memory at the end, causal
    softmax attention inside), and the last layer's outputs at the write places become M_{t+1}. M_0
    is ``memory_tokens`` learned embeddings. Training back-propagates through every segment of a row
    (the paper's BPTT, not truncated: a 128-token row is 4 segments). Positions (longlab's choice):
    each segment restarts at 0 — read memory 0..m-1, tokens m..m+s-1, write memory m+s..2m+s-1 — so
    no position past 2m+s is ever seen, at any evaluation length. ``memory_tokens=0`` is attention
    within each segment only (the ``segment`` baseline)."""

    name = "rmt"
    takes_bias = True  # each segment is plain causal attention: a position bias applies as in ``full``
    segment: int = 32
    memory_tokens: int = 4

    def __post_init__(self) -> None:
        check_range(self.name, "segment", self.segment, low=1, integer=True)
        check_range(self.name, "memory_tokens", self.memory_tokens, low=0, integer=True)

    def build(self, shape: ModelShape, layer: int) -> AttentionModule:
        return FullAttention()

    def runner(self, shape: ModelShape) -> Runner:
        return RmtRunner(shape.d_model, self.segment, self.memory_tokens)


class RmtRunner(Runner):
    def __init__(self, d_model: int, segment: int, memory_tokens: int):
        super().__init__()
        self.segment = segment
        # M_0, drawn like the token embeddings (std 0.02)
        self.memory = nn.Parameter(torch.randn(memory_tokens, d_model) * 0.02)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, blocks: nn.ModuleList) -> torch.Tensor:
        b, t, _ = x.shape
        m = self.memory.shape[0]
        memory = self.memory.to(x.dtype)[None].expand(b, -1, -1)
        outs = []
        for a in range(0, t, self.segment):
            tokens = x[:, a : a + self.segment]
            s = tokens.shape[1]
            h = torch.cat((memory, tokens, memory), dim=1)
            local = torch.arange(h.shape[1], device=x.device)
            for block in blocks:
                h = block(h, local)
            outs.append(h[:, m : m + s])
            memory = h[:, m + s :]  # the write places of the last layer: the next segment's read memory
        return torch.cat(outs, dim=1)
