"""``cumulative_average``: attention over one (key, value) pair, the average of every pair so far."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longlab.lab.attention.average import attend_one_pair
from longlab.lab.attention.base import AttentionModule, LabAttention
from longlab.lab.positions.base import ModelShape
from longlab.lab.registry import register


@register
@dataclass(frozen=True)
class CumulativeAverage(LabAttention):
    """Cumulative average cache (Xiao & Zhu, 2025, "Foundations of Large Language Models",
    arXiv:2501.09223, Ch. 2, long-sequence modeling, fixed-size KV cache): the KV cache is replaced by
    Mem_i = (sum_{j<=i} k_j / (i+1), sum_{j<=i} v_j / (i+1)) (0-based i), updated recurrently as
    Mem_i = ((k_i, v_i) + i Mem_{i-1}) / (i+1), and token i's output is Att(q_i, Mem_i). Attention over
    a single pair returns its value, so the output is the cumulative average of the values: the
    average layer of the Average Attention Network (Zhang et al., 2018, "Accelerating Neural Transformer
    via an Average Attention Network", §3, eq. 1; without its FFN and gate, which the lab block's
    SwiGLU and residual play). State per layer: one (key, value) pair, 2d floats per head. The training
    form is a cumulative sum (O(T d)); :class:`CumulativeAverageState` is the recurrent decoding form."""

    name = "cumulative_average"

    def build(self, shape: ModelShape, layer: int) -> AttentionModule:
        return CumulativeAverageAttention()


class CumulativeAverageAttention(AttentionModule):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Att(q_i, Mem_i) = the averaged value (one key: softmax weight 1), so q and k do not enter
        count = torch.arange(1, v.shape[2] + 1, dtype=v.dtype, device=v.device)
        return v.cumsum(dim=2) / count[:, None]


class CumulativeAverageState:
    """Recurrent decoding: Mem_i = ((k_i, v_i) + i Mem_{i-1}) / (i + 1), one pair whatever the length."""

    def __init__(self) -> None:
        self.seen = 0
        self.key: torch.Tensor | None = None
        self.value: torch.Tensor | None = None

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v (B, H, d) of the new token -> its output (B, H, d)."""
        i = self.seen
        self.key = k if self.key is None else (k + i * self.key) / (i + 1)
        self.value = v if self.value is None else (v + i * self.value) / (i + 1)
        self.seen += 1
        return attend_one_pair(q, self.key, self.value)
