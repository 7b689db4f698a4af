"""``dilated``: a sliding window with gaps — query i sees keys i, i - d, i - 2d, ... (window keys)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longlab.errors import SpecError
from longlab.lab.attention.base import AttentionModule, LabAttention
from longlab.lab.attention.sparse import SparseAttention
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
    deep). Each query gathers its own ``window`` keys (a block of one query): memory O(T * window).
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
    def __init__(self, window: int, dilations: tuple[int, ...]):
        super().__init__()
        self.window, self.dilations = window, dilations

    def pattern(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # one head group when all heads share the dilation, else one per head
        per_head = self.dilations if len(set(self.dilations)) > 1 else self.dilations[:1]
        dilation = torch.tensor(per_head, device=device).view(-1, 1, 1)
        steps = torch.arange(self.window, device=device)
        index = torch.arange(length, device=device).view(1, -1, 1) - steps * dilation  # (G, T, window)
        allowed = torch.ones(index.shape[0], length, 1, self.window, dtype=torch.bool, device=device)
        return index, allowed
