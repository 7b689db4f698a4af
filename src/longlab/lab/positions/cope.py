"""``cope``: contextual positions, counted by the query's gates over the keys (Golovneva et al., 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from longlab.attention.contextual import contextual_attention
from longlab.lab.positions.base import LabPosition, ModelShape, PositionModule
from longlab.lab.registry import register
from longlab.method import check_range


@register
@dataclass(frozen=True)
class CoPE(LabPosition):
    """CoPE (Golovneva et al., 2024, "Contextual Position Encoding: Learning to Count What's
    Important", arXiv 2405.18719, §3, eq. 3-5): gates g_ij = sigmoid(q_i . k_j / sqrt(d)), position
    p_ij = sum_{t=j..i} g_it clamped to ``npos`` - 1, logit (q_i . k_j + q_i . e[p_ij]) / sqrt(d) with
    e[p] interpolated between e[floor p] and e[ceil p]. As the paper's code (facebookresearch/RAM,
    projects/cope): one table e (npos x head_dim) per layer shared by the heads, initialised to zero
    (so an untrained CoPE model is NoPE), the scaled product in the gates, the position logit divided
    by sqrt(d) with q . k, and ``npos`` defaulting to the training length + 1.

    CoPE's positions depend on q and k, so it computes attention itself (``attend``) and needs the
    full softmax attention."""

    name = "cope"
    npos: int | None = None

    def __post_init__(self) -> None:
        check_range(self.name, "npos", self.npos, low=1, integer=True)

    def build(self, shape: ModelShape) -> PositionModule:
        return CoPEModule(shape.layers, self.npos or shape.train_length + 1, shape.head_dim)


class CoPEModule(PositionModule):
    has_attention = True

    def __init__(self, layers: int, npos: int, head_dim: int):
        super().__init__()
        self.embeddings = nn.Parameter(torch.zeros(layers, npos, head_dim))

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, layer: int
    ) -> torch.Tensor:
        return contextual_attention(q, k, v, self.embeddings[layer])
