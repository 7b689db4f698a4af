"""``fire``: a learned MLP of the log-normalised relative distance."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from longlab.lab.positions.base import LabPosition, ModelShape, PositionModule, distance
from longlab.lab.registry import register
from longlab.method import check_range


@register
@dataclass(frozen=True)
class Fire(LabPosition):
    """FIRE (Li et al., 2024, "Functional Interpolation for Relative Positions Improves Long Context
    Transformers", §3, eq. 4-5): score(i, j) += f(psi(i - j) / psi(max(L, i))), psi(x) = log(c x + 1),
    f an MLP 1 -> hidden -> H (ReLU), c and the threshold L learned. Dividing by the query's own
    (log) position keeps the MLP's input in [0, 1] at any length. Defaults: hidden 32 and c = 1 (the
    paper's); L starts at the training length (longlab's choice)."""

    name = "fire"
    hidden: int = 32
    c: float = 1.0
    threshold: float | None = None

    def __post_init__(self) -> None:
        check_range(self.name, "hidden", self.hidden, low=1, integer=True)
        check_range(self.name, "c", self.c, low=0.0, low_open=True)
        check_range(self.name, "threshold", self.threshold, low=1.0)

    def build(self, shape: ModelShape) -> PositionModule:
        return FireModule(shape.heads, self.hidden, self.c, self.threshold or float(shape.train_length))


class FireModule(PositionModule):
    has_bias = True

    def __init__(self, heads: int, hidden: int, c: float, threshold: float):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(hidden, 1) * 0.5)
        self.b1 = nn.Parameter(torch.zeros(hidden))
        self.w2 = nn.Parameter(torch.randn(heads, hidden) / hidden**0.5)
        self.b2 = nn.Parameter(torch.zeros(heads))
        self.c = nn.Parameter(torch.tensor(float(c)))
        self.threshold = nn.Parameter(torch.tensor(float(threshold)))

    def bias_params(self) -> tuple[torch.Tensor, ...]:
        return (self.w1, self.b1, self.w2, self.b2, self.c, self.threshold)

    def bias(self, params, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        w1, b1, w2, b2, c, threshold = params
        dtype = w1.dtype
        psi_d = torch.log1p(c * distance(q_pos, k_pos).to(dtype))  # (bq, bk)
        psi_q = torch.log1p(c * torch.maximum(q_pos.to(dtype), threshold))  # (bq,)
        x = (psi_d / psi_q[:, None])[..., None]  # (bq, bk, 1)
        hidden = torch.relu(x @ w1.T + b1)  # (bq, bk, hidden)
        return (hidden @ w2.T + b2).permute(2, 0, 1)  # (H, bq, bk)

    @torch.no_grad()
    def project(self) -> None:
        self.c.clamp_(min=1e-3)  # psi needs c > 0
        self.threshold.clamp_(min=1.0)
