"""``cosformer``: ReLU linear attention re-weighted by cos(pi/2 (i - j) / M), kept linear by splitting
the cosine into its cos and sin terms."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longlab.errors import LonglabError
from longlab.lab.attention.base import AttentionModule, LabAttention
from longlab.lab.attention.kernelized import KernelizedAttention, Recurrent
from longlab.lab.positions.base import ModelShape
from longlab.lab.registry import register
from longlab.method import check_range


@register
@dataclass(frozen=True)
class CosFormer(LabAttention):
    """cosFormer (Qin et al., 2022, "cosFormer: Rethinking Softmax in Attention", §3.2-3.3, eq. 8-11):
    s(q_i, k_j) = relu(q_i).relu(k_j) cos(pi/2 (i - j) / M), causal (j <= i), normalised by the sum
    over j. cos(a - b) = cos a cos b + sin a sin b (eq. 10-11), so it is linear attention with the
    features [relu(x) cos(pi i / 2M), relu(x) sin(pi i / 2M)] (shared chunked/recurrent forms).

    M (``horizon``): 0 (default) = the current sequence length, as the paper's code (M = the longest
    sequence of the batch): weights stay in [0, 1] at every length, but the decay stretches with the
    length (at 16x the training length, distance L gets cos(pi/32) = 0.995 instead of 0). A fixed
    M > 0 keeps training's decay at any length but must be at least the longest sequence (beyond M the
    cosine turns negative and the normaliser can vanish): longer sequences are refused. Decoding with
    M = 0 needs the total length up front (:meth:`CosFormerAttention.recurrent`). ``reweight=false``
    drops the cosine: plain ReLU linear attention."""

    name = "cosformer"
    horizon: int = 0
    reweight: bool = True
    chunk: int = 64
    eps: float = 1e-6

    def __post_init__(self) -> None:
        check_range(self.name, "horizon", self.horizon, low=0, integer=True)
        check_range(self.name, "chunk", self.chunk, low=1, integer=True)
        check_range(self.name, "eps", self.eps, low=0.0, low_open=True, high=1.0)

    def build(self, shape: ModelShape, layer: int) -> AttentionModule:
        return CosFormerAttention(self.horizon, self.reweight, self.chunk, self.eps)


class CosFormerAttention(KernelizedAttention):
    def __init__(self, horizon: int, reweight: bool, chunk: int, eps: float):
        super().__init__(chunk, eps)
        self.horizon, self.reweight = horizon, reweight

    def features(self, x: torch.Tensor, positions: torch.Tensor, key: bool, length: int) -> torch.Tensor:
        relu = torch.relu(x)
        if not self.reweight:
            return relu
        if self.horizon and length > self.horizon:
            raise LonglabError(
                f"cosformer: a sequence of {length} tokens exceeds horizon M = {self.horizon} (the cosine "
                f"re-weighting would turn negative); use horizon >= {length} or horizon=0 (M = the length)"
            )
        angle = (math.pi / 2 / (self.horizon or length)) * positions.to(x.dtype)[:, None]
        return torch.cat([relu * torch.cos(angle), relu * torch.sin(angle)], dim=-1)

    def recurrent(self, length: int | None = None) -> Recurrent:
        if self.reweight and not self.horizon and length is None:
            raise LonglabError("cosformer: decoding with horizon=0 (M = the length) needs the total length up front")
        return Recurrent(self, length)
