"""Causal attention inside fixed segments: the local part every memory component (``infini``,
``memorizing``) combines with its memory of earlier segments. Token i of segment s (tokens
[s * segment, (s + 1) * segment)) sees the tokens of segment s up to itself and nothing before."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def split(length: int, segment: int) -> list[tuple[int, int]]:
    """The [start, end) bounds of consecutive segments covering ``length`` tokens (the last may be short)."""
    return [(a, min(a + segment, length)) for a in range(0, length, segment)]


def in_segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment: int) -> torch.Tensor:
    """Causal softmax attention of (B, H, T, d) tensors within each segment of ``segment`` tokens.

    The sequence is padded to whole segments and viewed as (B, H * n, segment, d), so one fused
    causal SDPA call does every segment: memory O(T * segment), never T x T. Padding sits at the end
    of the last segment, after every real token, so causality already hides it from real queries."""
    b, h, t, _ = q.shape
    pad = -t % segment
    n = (t + pad) // segment

    def blocks(x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 0, 0, pad)).reshape(b, h * n, segment, x.shape[-1])

    out = F.scaled_dot_product_attention(blocks(q), blocks(k), blocks(v), is_causal=True)
    return out.reshape(b, h, n * segment, v.shape[-1])[:, :, :t]
