"""The block-sparse routine every sparse-pattern attention (dilated, longformer, bigbird, longnet,
blockwise) runs on: per query block, the key positions a pattern allows are gathered and an exact
softmax is taken over them.

A pattern describes itself by two tensors (docs/lab.md, "Sparse attention"):

- ``index`` (G, n, K): for each of the n = ceil(T / block) query blocks, K candidate key positions
  (G = 1 when every head shares the pattern, G = H when heads differ). Entries outside [0, T) are
  allowed and ignored, so a pattern can write "the 64 keys before the block" without clipping.
- ``allowed`` (G, n, block, K): which candidate each query of the block attends.

Each (query, slot) pair counts once: a key listed in two slots weighs twice. Patterns that are sets
list a key once; LongNet's mix of dilated attentions (Ding et al., 2023, eq. 9) is exactly the
softmax over the *multiset* of its pairs' keys, so it lists a key once per pair that selects it.
Memory is O(B H T K d) for the gathered keys and O(B H T K) for the scores, never T x T. A query
with no allowed key (LongNet's unselected rows) gets a zero output, as in the paper's scatter.
"""

from __future__ import annotations

import math

import torch

from longlab.lab.attention.base import AttentionModule


def query_positions(blocks: int, block: int, device: torch.device) -> torch.Tensor:
    """(n, block): the position of each query of each block (the last block runs past T)."""
    return torch.arange(blocks * block, device=device).view(blocks, block)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    allowed: torch.Tensor,
    block: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact softmax attention of q (B, H, T, d) over the keys ``index`` / ``allowed`` select per query
    block of ``block`` queries (shapes in the module docstring); returns (B, H, T, d_v)."""
    b, h, t, d = q.shape
    blocks = -(-t // block)
    groups, n, slots = index.shape
    if n != blocks or groups not in (1, h) or allowed.shape != (groups, n, block, slots):
        raise ValueError(f"pattern of shape {tuple(index.shape)} / {tuple(allowed.shape)} does not fit T={t}, H={h}")
    scale = 1 / math.sqrt(d) if scale is None else scale
    inside = (index >= 0) & (index < t)
    allowed = allowed & inside[:, :, None, :]
    # one flat gather over (head, position): k.reshape(B, H*T, d)[:, head * T + position]
    heads = torch.arange(h, device=q.device).view(h, 1, 1)
    flat = (index.clamp(0, t - 1).expand(h, n, slots) + heads * t).reshape(-1)
    keys = k.reshape(b, h * t, d)[:, flat].view(b, h, n, slots, d)
    values = v.reshape(b, h * t, v.shape[-1])[:, flat].view(b, h, n, slots, v.shape[-1])
    padded = torch.nn.functional.pad(q, (0, 0, 0, blocks * block - t)).view(b, h, n, block, d)
    scores = (padded @ keys.transpose(-1, -2)) * scale  # (B, H, n, block, K)
    scores = scores.masked_fill(~allowed.expand(h, n, block, slots), -math.inf)
    # the row maximum only stabilises exp (softmax is shift-invariant): no gradient through it
    top = scores.detach().amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp(scores - top)
    total = weights.sum(-1, keepdim=True)
    out = (weights @ values) / torch.where(total > 0, total, torch.ones_like(total))
    return out.reshape(b, h, n * block, -1)[:, :, :t]


class SparseAttention(AttentionModule):
    """A pattern's module: ``pattern`` gives (index, allowed) for a length; forward runs the routine."""

    block: int = 1

    def pattern(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        index, allowed = self.pattern(q.shape[2], q.device)
        return block_sparse_attention(q, k, v, index, allowed, self.block)
