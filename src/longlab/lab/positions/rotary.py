"""Differentiable rotation for training (``longlab.positions.rope.rotate`` writes into a preallocated
output, which autograd cannot follow); the angles come from the same :func:`cos_sin`."""

from __future__ import annotations

import torch

from longlab.positions.rope import FrequencyTable, cos_sin


def rotate_pairs(x: torch.Tensor, positions: torch.Tensor, table: FrequencyTable) -> torch.Tensor:
    """Rotate channel pairs (i, i + d/2) of x (B, H, T, d) by positions (T,) * inv_freq_i."""
    cos, sin = cos_sin(positions[None], table, x.dtype)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
