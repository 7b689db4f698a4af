"""``linear``: kernelized attention with phi(x) = elu(x) + 1, as a chunked parallel form for training
and a constant-memory recurrent form for decoding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longlab.lab.attention.base import AttentionModule, LabAttention
from longlab.lab.attention.kernelized import KernelizedAttention, Recurrent
from longlab.lab.positions.base import ModelShape
from longlab.lab.registry import register
from longlab.method import check_range


def feature(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 (Katharopoulos et al., 2020, §3.2.1): positive, so the normaliser is too."""
    return F.elu(x) + 1


@register
@dataclass(frozen=True)
class Linear(LabAttention):
    """Linear attention (Katharopoulos et al., 2020, "Transformers are RNNs: Fast Autoregressive
    Transformers with Linear Attention", §3.2-3.4, eq. 6 and 16-20): out_i = phi(q_i)^T S_i /
    phi(q_i)^T z_i with S_i = sum_{j<=i} phi(k_j) v_j^T and z_i = sum_{j<=i} phi(k_j). Training
    walks chunks of ``chunk`` queries (a causal C x C product inside, the running state S between
    chunks; :func:`~longlab.lab.attention.kernelized.causal_linear_attention`, shared with
    ``performer`` and ``cosformer``), so memory is O(T d + d^2) per chunk; decoding carries (S, z)
    only (:class:`LinearState`).
    Positions: q and k are rotated by the position component before phi (longlab's choice)."""

    name = "linear"
    chunk: int = 64
    eps: float = 1e-6

    def __post_init__(self) -> None:
        check_range(self.name, "chunk", self.chunk, low=1, integer=True)
        check_range(self.name, "eps", self.eps, low=0.0, low_open=True, high=1.0)

    def build(self, shape: ModelShape, layer: int) -> AttentionModule:
        return LinearAttention(self.chunk, self.eps)


class LinearAttention(KernelizedAttention):
    def features(self, x: torch.Tensor, positions: torch.Tensor, key: bool, length: int) -> torch.Tensor:
        return feature(x)


class LinearState(Recurrent):
    """Recurrent decoding (Katharopoulos et al., 2020, eq. 18-20): one token at a time, O(d^2) state."""

    def __init__(self, eps: float = 1e-6):
        super().__init__(LinearAttention(chunk=1, eps=eps))
