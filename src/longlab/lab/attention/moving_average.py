"""``moving_average``: attention over one (key, value) pair, the average of the last ``window`` pairs."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longlab.lab.attention.average import attend_one_pair
from longlab.lab.attention.base import AttentionModule, LabAttention
from longlab.lab.positions.base import ModelShape
from longlab.lab.registry import register
from longlab.method import check_range


@register
@dataclass(frozen=True)
class MovingAverage(LabAttention):
    """Moving average cache (Xiao & Zhu, 2025, "Foundations of Large Language Models",
    arXiv:2501.09223, Ch. 2, long-sequence modeling, fixed-size KV cache): the KV cache is replaced by
    Mem_i = (sum_{j=i-n_c+1}^{i} k_j / n_c, sum_{j=i-n_c+1}^{i} v_j / n_c) with n_c = ``window``, and
    token i's output is Att(q_i, Mem_i), i.e. the unweighted moving average of the last n_c values
    (attention over one pair returns its value). The first n_c - 1 tokens average the min(i+1, n_c)
    pairs that exist (longlab's choice: the survey's formula assumes a full window). The survey's
    definition, not Mega's damped EMA (Ma et al., 2023). State per layer: the averaged pair (2d floats
    per head) plus, to slide exactly, the last n_c pairs (:class:`MovingAverageState`). Default window
    32: the memory family's segment length."""

    name = "moving_average"
    window: int = 32

    def __post_init__(self) -> None:
        check_range(self.name, "window", self.window, low=1, integer=True)

    def build(self, shape: ModelShape, layer: int) -> AttentionModule:
        return MovingAverageAttention(self.window)


class MovingAverageAttention(AttentionModule):
    def __init__(self, window: int):
        super().__init__()
        self.window = window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b, h, t, d = v.shape
        # a window sum by average pooling over zeros padded in front (exact, unlike differences of a
        # long cumulative sum), then divided by how many real pairs the window holds
        rows = F.pad(v.transpose(-1, -2).reshape(b * h, d, t), (self.window - 1, 0))
        total = F.avg_pool1d(rows, self.window, stride=1) * self.window
        count = torch.arange(1, t + 1, dtype=v.dtype, device=v.device).clamp(max=self.window)
        return (total / count).view(b, h, d, t).transpose(-1, -2)


class MovingAverageState:
    """Recurrent decoding: the last ``window`` pairs and their average; memory constant in the length."""

    def __init__(self, window: int):
        self.pairs: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=window)

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v (B, H, d) of the new token -> its output (B, H, d)."""
        self.pairs.append((k, v))
        key = torch.stack([pair[0] for pair in self.pairs]).mean(0)
        value = torch.stack([pair[1] for pair in self.pairs]).mean(0)
        return attend_one_pair(q, key, value)
