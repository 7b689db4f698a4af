"""Rotary position embedding: the model's RoPE constants, frequency tables, and the rotation itself.

RoPE (Su et al., 2021, "RoFormer", eq. 34) rotates each pair of channels (i, i + d/2) of a query or
key at position p by the angle p * inv_freq_i, with inv_freq_i = base^(-2i/d). Because keys are
cached unrotated (DESIGN 2.1), the attention kernel calls :func:`rotate` itself, with whatever
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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def cos_sin(positions: torch.Tensor, table: FrequencyTable, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (B, 1, T, d) for positions (B, T), scaled by the attention factor.

    The angle is computed in float32 exactly as transformers' rotary embedding does (float64 for a
    float64 model or table), then cast to ``dtype``.
    """
    precision = torch.float64 if torch.float64 in (dtype, table.inv_freq.dtype) else torch.float32
    inv_freq = table.inv_freq.to(positions.device, precision)
    freqs = positions.to(precision)[..., None] * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    cos = angles.cos() * table.attention_factor
    sin = angles.sin() * table.attention_factor
    return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


def rotate(x: torch.Tensor, positions: torch.Tensor, table: FrequencyTable, inverse: bool = False) -> torch.Tensor:
    """Rotate x (B, H, T, d) to positions (B, T). ``inverse`` applies the transpose (for gradients)."""
    cos, sin = cos_sin(positions, table, x.dtype)
    if inverse:
        return x * cos - rotate_half(x) * sin
    return x * cos + rotate_half(x) * sin
