"""``linear``: kernelized attention with phi(x) = elu(x) + 1, as a chunked parallel form for training
and a constant-memory recurrent form for decoding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longlab.lab.attention.base import AttentionModule, LabAttention
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
    chunks), so memory is O(T d + d^2) per chunk; decoding carries (S, z) only (:class:`LinearState`).
    Positions: q and k are rotated by the position component before phi (longlab's choice)."""

    name = "linear"
    chunk: int = 64
    eps: float = 1e-6

    def __post_init__(self) -> None:
        check_range(self.name, "chunk", self.chunk, low=1, integer=True)
        check_range(self.name, "eps", self.eps, low=0.0, low_open=True, high=1.0)

    def build(self, shape: ModelShape, layer: int) -> AttentionModule:
        return LinearAttention(self.chunk, self.eps)


class LinearAttention(AttentionModule):
    keeps_kv = False  # decoding carries (S, z), not K/V per token

    def __init__(self, chunk: int, eps: float):
        super().__init__()
        self.chunk, self.eps = chunk, eps

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        fq, fk = feature(q), feature(k)
        b, h, t, d = q.shape
        state = torch.zeros(b, h, d, v.shape[-1], dtype=q.dtype, device=q.device)  # S: sum phi(k) v^T so far
        norm = torch.zeros(b, h, d, dtype=q.dtype, device=q.device)  # z: sum phi(k) so far
        outs = []
        for a in range(0, t, self.chunk):
            z = min(a + self.chunk, t)
            cq, ck, cv = fq[:, :, a:z], fk[:, :, a:z], v[:, :, a:z]
            inside = torch.ones(z - a, z - a, dtype=torch.bool, device=q.device).tril()
            weights = (cq @ ck.transpose(-1, -2)).masked_fill(~inside, 0.0)  # causal, within the chunk
            numerator = weights @ cv + cq @ state
            denominator = weights.sum(-1) + (cq * norm[:, :, None]).sum(-1)
            outs.append(numerator / (denominator[..., None] + self.eps))
            state = state + ck.transpose(-1, -2) @ cv
            norm = norm + ck.sum(2)
        return torch.cat(outs, dim=2)


class LinearState:
    """Recurrent decoding (Katharopoulos et al., 2020, eq. 18-20): one token at a time, O(d^2) state."""

    def __init__(self, eps: float = 1e-6):
        self.eps = eps
        self.state: torch.Tensor | None = None
        self.norm: torch.Tensor | None = None

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v (B, H, d) of the new token -> its output (B, H, d)."""
        fq, fk = feature(q), feature(k)
        update = fk[..., :, None] * v[..., None, :]
        self.state = update if self.state is None else self.state + update
        self.norm = fk if self.norm is None else self.norm + fk
        numerator = (fq[..., :, None] * self.state).sum(-2)
        return numerator / ((fq * self.norm).sum(-1, keepdim=True) + self.eps)
