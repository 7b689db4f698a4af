"""Rotary position embedding: the model's RoPE constants, frequency tables, and the rotation itself.

RoPE (Su et al., 2021, "RoFormer", eq. 34) rotates each pair of channels (i, i + d/2) of a query or
key at position p by the angle p * inv_freq_i, with inv_freq_i = base^(-2i/d). Because keys are
cached unrotated (docs/design.md), the attention kernel calls :func:`rotate` itself, with whatever
positions the active method assigns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RopeConfig:
    """The RoPE constants of one model, read from its config at ``apply`` time.

    ``native_inv_freq`` and ``native_attention_factor`` are what the unpatched model uses (its own
    ``rope_parameters``); the method ``none`` reproduces them exactly.
    """

    head_dim: int
    base: float
    original_length: int
    native_inv_freq: torch.Tensor
    native_attention_factor: float = 1.0

    def inv_freq(self) -> torch.Tensor:
        """Plain RoPE frequencies base^(-2i/d), computed as transformers does (float32)."""
        return base_inv_freq(self.head_dim, self.base)


@dataclass(frozen=True)
class FrequencyTable:
    """What a query/key rotation needs: inv_freq (d/2 floats) and the factor that scales cos and sin."""

    inv_freq: torch.Tensor
    attention_factor: float = 1.0


def base_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (base**exponents)


def cos_sin(positions: torch.Tensor, table: FrequencyTable, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (B, 1, T, d/2) for positions (B, T), scaled by the attention factor.

    The angle is computed in float32 exactly as transformers' rotary embedding does (float64 for a
    float64 model or table), then cast to ``dtype``.
    """
    precision = torch.float64 if torch.float64 in (dtype, table.inv_freq.dtype) else torch.float32
    inv_freq = table.inv_freq.to(positions.device, precision)
    angles = positions.to(precision)[..., None] * inv_freq
    cos = angles.cos() * table.attention_factor
    sin = angles.sin() * table.attention_factor
    return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


def rotate(x: torch.Tensor, positions: torch.Tensor, table: FrequencyTable, inverse: bool = False) -> torch.Tensor:
    """Rotate x (B, H, T, d) to positions (B, T): channel pairs (i, i + d/2) turn by angle p * inv_freq_i.

    Written half by half into one output (x1 c - x2 s, x2 c + x1 s), which equals transformers'
    ``x * cos + rotate_half(x) * sin`` but moves less memory. ``inverse`` applies the transpose.
    """
    cos, sin = cos_sin(positions, table, x.dtype)
    if inverse:
        sin = -sin
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    first, second = out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=first).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=second).addcmul_(x1, sin)
    return out
