"""``knorm``: keep the keys with the smallest L2 norm."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longlab.cache.policy import EvictionPolicy, ScoreContext
from longlab.method import register


@register
@dataclass(frozen=True)
class KNorm(EvictionPolicy):
    """K-norm (Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache
    Compression"): keys with a low L2 norm draw high attention, so keep the lowest-norm keys per head.
    The norm of the unrotated key equals the rotated one's (RoPE is a rotation). Query-agnostic."""

    name = "knorm"

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        return -ctx.keys.float().norm(dim=-1).double()
