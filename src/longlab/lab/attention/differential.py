"""``differential``: the difference of two softmax maps, normalised per head (Differential Transformer)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from longlab.errors import SpecError
from longlab.lab.attention.base import AttentionModule, LabAttention
from longlab.lab.positions.base import ModelShape
from longlab.lab.registry import register
from longlab.method import check_range


@register
@dataclass(frozen=True)
class Differential(LabAttention):
    """Differential attention (Ye et al., 2024, "Differential Transformer", arXiv 2410.05258, §2.1,
    eq. 1-3). Heads are halved so the parameter count matches multi-head attention, as the paper does:
    differential head i takes query heads 2i, 2i+1 as [Q1; Q2] (d each), key heads 2i, 2i+1 as
    [K1; K2] and value heads 2i, 2i+1 concatenated as V (2d), and computes

        (softmax(Q1 K1^T / sqrt d) - lambda softmax(Q2 K2^T / sqrt d)) V                  (eq. 1)
        lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init                            (eq. 2)
        out = (1 - lambda_init) RMSNorm(head)  (per head: GroupNorm, eq. 3)

    with learnable lq1, lk1, lq2, lk2 (d each, per layer, drawn from N(0, 0.1^2) as the authors' code)
    and lambda_init = 0.8 - 0.6 exp(-0.3 (l - 1)) for layer l = 1..L unless given. Each map is an
    exact causal softmax (SDPA with q and k zero-padded to v's 2d, so the fused kernels take it:
    memory O(T d), no T x T matrix)."""

    name = "differential"
    lambda_init: float | None = None

    def __post_init__(self) -> None:
        check_range(self.name, "lambda_init", self.lambda_init, low=0.0, high=1.0)
        if self.lambda_init == 1.0:  # (1 - lambda_init) would zero every output
            raise SpecError(f"{self.name}: parameter 'lambda_init' must be a number >= 0 and < 1, got 1.0")

    def build(self, shape: ModelShape, layer: int) -> AttentionModule:
        if shape.heads % 2:
            raise SpecError(f"{self.name}: needs an even number of heads (pairs of maps), the model has {shape.heads}")
        init = default_lambda_init(layer) if self.lambda_init is None else self.lambda_init
        return DifferentialAttention(shape.head_dim, init)


def default_lambda_init(layer: int) -> float:
    """lambda_init = 0.8 - 0.6 exp(-0.3 (l - 1)) for 1-based layer l (Ye et al., 2024, §2.1)."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer)


class DifferentialAttention(AttentionModule):
    def __init__(self, head_dim: int, lambda_init: float):
        super().__init__()
        self.lambda_init = lambda_init
        self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
            nn.Parameter(torch.randn(head_dim) * 0.1) for _ in range(4)
        )
        self.norm = nn.RMSNorm(2 * head_dim, eps=1e-5)  # per head, over its 2d channels

    def lam(self) -> torch.Tensor:
        """lambda (eq. 2), a scalar tensor."""
        first = torch.exp((self.lambda_q1 * self.lambda_k1).sum())
        return first - torch.exp((self.lambda_q2 * self.lambda_k2).sum()) + self.lambda_init

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """q, k, v (B, H, T, d) -> (B, H/2, T, 2d): the model's output projection reads H/2 heads of 2d."""
        d = q.shape[-1]
        value = torch.cat((v[:, 0::2], v[:, 1::2]), dim=-1)  # head i: channels of value heads 2i, 2i+1
        # fused kernels want one head size for q, k and v (torch 2.13's CPU flash kernel falls back to
        # the T x T math path otherwise): zero-pad q and k to 2d, which leaves every score unchanged
        q, k = F.pad(q, (0, d)), F.pad(k, (0, d))
        first = F.scaled_dot_product_attention(q[:, 0::2], k[:, 0::2], value, is_causal=True, scale=d**-0.5)
        second = F.scaled_dot_product_attention(q[:, 1::2], k[:, 1::2], value, is_causal=True, scale=d**-0.5)
        lam = self.lam().to(q.dtype)
        return self.norm(first - lam * second) * (1 - self.lambda_init)
