"""``performer``: FAVOR+ attention, positive orthogonal random features estimating the softmax kernel."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from longlab.lab.attention.base import AttentionModule, LabAttention
from longlab.lab.attention.kernelized import KernelizedAttention
from longlab.lab.positions.base import ModelShape
from longlab.lab.registry import register
from longlab.method import check_range


def orthogonal_features(count: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random feature vectors w (count, dim), orthogonal within each block of ``dim`` rows
    (Choromanski et al., 2021, §2.4: Gaussian blocks orthogonalised by QR), each row rescaled to the
    norm of a fresh Gaussian vector so that every row is marginally N(0, I) and the estimate stays
    unbiased. Drawn in float64 by ``generator`` (a CPU one: the same seed gives the same features on
    every device)."""
    blocks = []
    for _ in range(math.ceil(count / dim)):
        gaussian = torch.randn(dim, dim, dtype=torch.float64, generator=generator, device="cpu")
        q, r = torch.linalg.qr(gaussian)
        # the sign of R's diagonal makes Q Haar-distributed (QR alone prefers some orientations)
        blocks.append((q * torch.sign(torch.diagonal(r))).T)
    rows = torch.cat(blocks)[:count]
    norms = torch.randn(count, dim, dtype=torch.float64, generator=generator, device="cpu").norm(dim=1)
    return rows * norms[:, None]


def draw_seed(seed: int, layer: int, draw: int) -> int:
    """A generator seed for (seed, layer, draw): independent streams per layer and per redraw."""
    return int(np.random.SeedSequence([seed, layer, draw]).generate_state(1)[0])


def positive_features(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """phi(x) = exp(w.x - |x|^2 / 2) / sqrt(m) of x (..., d) already scaled by d^-1/4 (Choromanski et
    al., 2021, eq. 5-7 with h(x) = exp(-|x|^2/2), f = exp): E[phi(x).phi(y)] = exp(x.y). Unstabilised:
    the equation, used by the tests; the module computes the same estimate stabilised."""
    m = projection.shape[0]
    return torch.exp(x @ projection.T - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(m)


@register
@dataclass(frozen=True)
class Performer(LabAttention):
    """Performer's FAVOR+ (Choromanski et al., 2021, "Rethinking Attention with Performers", §2.3-2.4,
    eq. 5-7): softmax attention exp(q.k / sqrt d) estimated with ``features`` positive orthogonal random
    features of q and k scaled by d^-1/4, phi(x) = exp(w.x - |x|^2/2)/sqrt(m), then causal linear
    attention (shared chunked/recurrent forms, ``chunk`` queries at a time). Stabilised as the paper's
    code: queries subtract their own maximum over features (and |q|^2/2), keys the running maximum of
    the keys so far; both are constants of the ratio, so the estimate is the same. Features are drawn
    from (``seed``, layer); ``redraw`` = N > 0 redraws them every N training steps (draw n from
    (seed, layer, n), so a resumed run redraws the same ones), 0 keeps them fixed. ``eps`` guards the
    denominator on the stabilised scale (0: the exact ratio). Defaults: 64 features (about d log d at
    the lab's head dimensions, the paper's m = Theta(d log d)), fixed features (longlab's choice)."""

    name = "performer"
    features: int = 64
    redraw: int = 0
    seed: int = 0
    chunk: int = 64
    eps: float = 1e-6

    def __post_init__(self) -> None:
        check_range(self.name, "features", self.features, low=1, integer=True)
        check_range(self.name, "redraw", self.redraw, low=0, integer=True)
        check_range(self.name, "seed", self.seed, low=0, integer=True)
        check_range(self.name, "chunk", self.chunk, low=1, integer=True)
        check_range(self.name, "eps", self.eps, low=0.0, high=1.0)

    def build(self, shape: ModelShape, layer: int) -> AttentionModule:
        return PerformerAttention(self.features, shape.head_dim, self.seed, layer, self.redraw, self.chunk, self.eps)


class PerformerAttention(KernelizedAttention):
    log_keys = True

    def __init__(self, features: int, head_dim: int, seed: int, layer: int, redraw: int, chunk: int, eps: float):
        super().__init__(chunk, eps)
        self.seed, self.layer, self.redraw = seed, layer, redraw
        generator = torch.Generator(device="cpu").manual_seed(draw_seed(seed, layer, 0))
        # buffers: saved with the model (a resumed run continues with the same features) and moved by .to()
        self.register_buffer("projection", orthogonal_features(features, head_dim, generator).float())
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # training forwards so far

    def features(self, x: torch.Tensor, positions: torch.Tensor, key: bool, length: int) -> torch.Tensor:
        x = x * x.shape[-1] ** -0.25
        projected = x @ self.projection.to(x.dtype).T
        if key:  # log phi(k): the running maximum is subtracted chunk by chunk (kernelized.KernelSums)
            return projected - (x * x).sum(-1, keepdim=True) / 2 - 0.5 * math.log(self.projection.shape[0])
        # exp(-|q|^2/2) and the maximum are constants of query i's ratio: dropped, and no gradient
        return torch.exp(projected - projected.detach().amax(-1, keepdim=True)) / math.sqrt(self.projection.shape[0])

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.training and self.redraw:
            steps = int(self.steps)
            if steps and steps % self.redraw == 0:
                seed = draw_seed(self.seed, self.layer, steps // self.redraw)
                generator = torch.Generator(device="cpu").manual_seed(seed)
                drawn = orthogonal_features(self.projection.shape[0], self.projection.shape[1], generator)
                self.projection.copy_(drawn)
            self.steps += 1
        return super().forward(q, k, v, positions)
