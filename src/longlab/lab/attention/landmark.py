"""``landmark``: a landmark token after every block gates attention to that block (grouped softmax);
at evaluation each query retrieves its top-k blocks by landmark score."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from longlab.lab.attention.base import AttentionModule, LabAttention, Runner
from longlab.lab.positions.base import ModelShape
from longlab.lab.registry import register
from longlab.method import check_range


@register
@dataclass(frozen=True)
class Landmark(LabAttention):
    """Landmark attention (Mohtashami & Jaggi, 2023, "Landmark Attention: Random-Access Infinite
    Context Length for Transformers", NeurIPS, §3.1 grouped softmax, §3.2 inference). A learned
    landmark token is inserted after every ``block`` tokens. Query i of block b attends with one
    softmax over its group — the regular tokens j <= i of block b and the landmarks of blocks g < b
    (its own landmark excluded) — and a regular token j of an earlier block g gets
    softmax_{block g}(q_i.k_j) * S_{i, landmark g}: the landmark's share gates its block; landmarks
    themselves carry no value weight. Training runs the whole sequence with landmarks inserted
    (every earlier block); in evaluation mode each query keeps only its ``top_k`` earlier blocks by
    landmark score q_i.k_landmark (per head), plus its own block, so with ``top_k`` >= the number of
    earlier blocks it is exactly the training form. Outputs at landmark places are dropped, so the
    model's output has the input's length. Positions (longlab's choice): regular tokens keep theirs,
    a landmark takes its block's last position; the paper's stingy position mapping is not done.
    Memory: one query block at a time, O(block * T) per step, never T x T."""

    name = "landmark"
    block: int = 32
    top_k: int = 4

    def __post_init__(self) -> None:
        check_range(self.name, "block", self.block, low=1, integer=True)
        check_range(self.name, "top_k", self.top_k, low=1, integer=True)

    def build(self, shape: ModelShape, layer: int) -> AttentionModule:
        return LandmarkAttention(self.block, self.top_k)

    def runner(self, shape: ModelShape) -> Runner:
        return LandmarkRunner(shape.d_model, self.block)


def insert_landmarks(x: torch.Tensor, landmark: torch.Tensor, block: int) -> torch.Tensor:
    """x (B, T, ...) -> (B, T + T // block, ...): ``landmark`` (broadcast to one place) after every
    ``block`` tokens; a last partial block gets none."""
    b, t = x.shape[:2]
    n = t // block
    full = x[:, : n * block].reshape(b, n, block, *x.shape[2:])
    marks = landmark.expand(b, n, 1, *x.shape[2:])
    return torch.cat((torch.cat((full, marks), dim=2).flatten(1, 2), x[:, n * block :]), dim=1)


def drop_landmarks(x: torch.Tensor, block: int) -> torch.Tensor:
    """The inverse of :func:`insert_landmarks` on the regular places."""
    b, t = x.shape[:2]
    n = t // (block + 1)
    full = x[:, : n * (block + 1)].reshape(b, n, block + 1, *x.shape[2:])[:, :, :block]
    return torch.cat((full.flatten(1, 2), x[:, n * (block + 1) :]), dim=1)


class LandmarkRunner(Runner):
    def __init__(self, d_model: int, block: int):
        super().__init__()
        self.block = block
        self.landmark = nn.Parameter(torch.randn(d_model) * 0.02)  # like the token embeddings

    def forward(self, x: torch.Tensor, positions: torch.Tensor, blocks: nn.ModuleList) -> torch.Tensor:
        h = insert_landmarks(x, self.landmark.to(x.dtype), self.block)
        # a landmark sits at its block's last position: regular tokens keep their own distances
        last = positions[self.block - 1 :: self.block][: x.shape[1] // self.block]
        stream = insert_landmarks(positions[None], last[None, :, None], self.block)[0]
        for block in blocks:
            h = block(h, stream)
        return drop_landmarks(h, self.block)


class LandmarkAttention(AttentionModule):
    """Over a stream laid out by :func:`insert_landmarks`: every (block + 1)-th place is a landmark."""

    def __init__(self, block: int, top_k: int):
        super().__init__()
        self.block, self.top_k = block, top_k

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b, h, t, d = q.shape
        size, width = self.block, self.block + 1
        n = t // width  # complete blocks (each ends with its landmark)
        grouped_k = k[:, :, : n * width].reshape(b, h, n, width, d)
        grouped_v = v[:, :, : n * width].reshape(b, h, n, width, v.shape[-1])
        regular_k, regular_v, landmark_k = grouped_k[..., :size, :], grouped_v[..., :size, :], grouped_k[..., size, :]
        q = q * d**-0.5
        outs = []
        for g in range(-(-t // width)):
            a, z = g * width, min((g + 1) * width, t)
            cq = q[:, :, a:z]
            r = min(size, z - a)  # regular tokens of this block (its own landmark is never attended)
            own = cq @ k[:, :, a : a + r].transpose(-1, -2)
            causal = torch.ones(z - a, r, dtype=torch.bool, device=q.device).tril()
            own = own.masked_fill(~causal, -torch.inf)
            gates = cq @ landmark_k[:, :, :g].transpose(-1, -2)  # (B, H, c, g): scores of earlier landmarks
            keys, values = regular_k[:, :, :g], regular_v[:, :, :g]  # (B, H, g, block, d)
            if not self.training and self.top_k < g:
                gates, keys, values = _retrieve(gates, keys, values, self.top_k)
                far = torch.einsum("bhcd,bhckld->bhckl", cq, keys).softmax(-1)
                far = torch.einsum("bhckl,bhckld->bhckd", far, values)
            else:
                far = torch.einsum("bhcd,bhgld->bhcgl", cq, keys).softmax(-1)  # softmax inside each block
                far = torch.einsum("bhcgl,bhgld->bhcgd", far, values)
            share = torch.cat((own, gates), dim=-1).softmax(-1)  # the query's own group
            out = share[..., :r] @ v[:, :, a : a + r]
            outs.append(out + (share[..., r:, None] * far).sum(-2))
        return torch.cat(outs, dim=2)


def _retrieve(
    gates: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query and head, the ``top_k`` earlier blocks by landmark score (§3.2): their gate scores
    (B, H, c, k) and their regular keys and values (B, H, c, k, block, d), gathered, not masked."""
    b, h = gates.shape[:2]
    gates, index = gates.topk(top_k, dim=-1)  # (B, H, c, k)
    # advanced indexing, not gather with an index expanded over block * d (several times slower on CPU)
    bi = torch.arange(b, device=index.device)[:, None, None, None]
    hi = torch.arange(h, device=index.device)[None, :, None, None]
    return gates, keys[bi, hi, index], values[bi, hi, index]
