"""``infini``: Infini-attention, causal attention within each segment plus a compressive linear
memory of every earlier segment, mixed by a learned per-head gate."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from longlab.errors import SpecError
from longlab.lab.attention.base import AttentionModule, LabAttention
from longlab.lab.attention.recurrence import in_segment_attention, split
from longlab.lab.positions.base import ModelShape
from longlab.lab.registry import register
from longlab.method import check_range

UPDATES = ("linear", "delta")
EPS = 1e-6  # keeps the first segment's retrieval 0 / 0 at 0 (M_0 = 0, z_0 = 0)


@register
@dataclass(frozen=True)
class Infini(LabAttention):
    """Infini-attention (Munkhdalai et al., 2024, "Leave No Context Behind: Efficient Infinite Context
    Transformers with Infini-attention", arXiv 2404.07143, §2.1, eq. 3-10). Per segment of ``segment``
    tokens: causal dot-product attention within the segment (A_dot); retrieval from the memory of the
    earlier segments A_mem = sigma(Q) M_{s-1} / (sigma(Q) z_{s-1}) with sigma = ELU + 1 (eq. 3); then
    the memory takes the segment in: ``linear`` M_s = M_{s-1} + sigma(K)^T V (eq. 4) or ``delta``
    M_s = M_{s-1} + sigma(K)^T (V - sigma(K) M_{s-1} / (sigma(K) z_{s-1})) (eq. 5), z_s = z_{s-1} +
    sum_t sigma(K_t); output sigmoid(beta) A_mem + (1 - sigmoid(beta)) A_dot with one learned beta per
    head (eq. 6), initialised at 0. As in the paper's training, gradients flow through the memory
    across segments (back-propagation through the whole sequence); the memory is O(H d^2) whatever
    the length. q and k arrive rotated by the position component (longlab's choice, as ``linear``).
    Default segment: 32, a quarter of the lab's 128-token training length."""

    name = "infini"
    segment: int = 32
    update: str = "linear"

    def __post_init__(self) -> None:
        check_range(self.name, "segment", self.segment, low=1, integer=True)
        if self.update not in UPDATES:
            raise SpecError(f"{self.name}: parameter 'update' must be one of {', '.join(UPDATES)}, got {self.update!r}")

    def build(self, shape: ModelShape, layer: int) -> AttentionModule:
        return InfiniAttention(self.segment, self.update == "delta", shape.heads)


def feature(x: torch.Tensor) -> torch.Tensor:
    """sigma(x) = ELU(x) + 1 (eq. 3), positive so the normaliser z stays positive."""
    return F.elu(x) + 1


class InfiniAttention(AttentionModule):
    def __init__(self, segment: int, delta: bool, heads: int):
        super().__init__()
        self.segment, self.delta = segment, delta
        self.beta = nn.Parameter(torch.zeros(heads))  # gate logit per head; sigmoid(0) = an even mix

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        local = in_segment_attention(q, k, v, self.segment)
        fq, fk = feature(q), feature(k)
        b, h, t, d = q.shape
        memory = q.new_zeros(b, h, d, v.shape[-1])  # M: the associative matrix
        norm = q.new_zeros(b, h, d)  # z: the sum of sigma(K) so far
        retrieved = []
        for a, z in split(t, self.segment):
            sq, sk, sv = fq[:, :, a:z], fk[:, :, a:z], v[:, :, a:z]
            retrieved.append(_read(sq, memory, norm))
            # delta rule: write only what the memory does not already return for these keys
            written = sv - _read(sk, memory, norm) if self.delta else sv
            memory = memory + sk.transpose(-1, -2) @ written
            norm = norm + sk.sum(2)
        gate = torch.sigmoid(self.beta).to(q.dtype)[:, None, None]
        return gate * torch.cat(retrieved, dim=2) + (1 - gate) * local


def _read(features: torch.Tensor, memory: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """sigma(X) M / (sigma(X) z) for features (B, H, S, d): eq. 3 (and the delta rule's recall)."""
    return (features @ memory) / ((features @ norm[..., None]) + EPS)
