"""What every lab position component provides to the lab model (:mod:`longlab.lab.model`).

A component is a frozen, validated dataclass (the spec: ``alibi:scale=0.5``); ``build`` makes the
:class:`PositionModule` that holds its learnable parameters, if any. A module may act at four places,
and does nothing at the others:

- ``positions``: the positions a training batch uses (randomized positions sample them);
- ``absolute``: an embedding (T, d_model) added to the token embeddings (sinusoidal, learned);
- ``rotate``: a map of q or k (B, H, T, d) by position (RoPE, xPos);
- ``bias``: an additive attention bias for one (query block, key block), (H or 1, bq, bk), computed
  from ``bias_params()`` inside :func:`longlab.attention.biased.biased_attention` (never L x L);
- ``attend``: the whole causal attention of a layer, for positions that depend on q and k (CoPE);
  only under full attention (:func:`longlab.lab.components.model_spec` refuses the others).

One module is shared by every layer (as T5 shares its bucket table); docs/lab.md says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from longlab.method import Method


@dataclass(frozen=True)
class ModelShape:
    """The sizes a position module needs from the model it is built for."""

    d_model: int
    heads: int
    head_dim: int
    train_length: int
    layers: int = 1


@dataclass(frozen=True)
class LabPosition(Method):
    """Base of the lab's position components (kind ``lab-position``, registry :mod:`longlab.lab.registry`)."""

    kind = "lab-position"

    def build(self, shape: ModelShape) -> PositionModule:
        raise NotImplementedError


class PositionModule(nn.Module):
    """No position information at all (NoPE) unless a subclass overrides a hook."""

    has_bias = False
    has_attention = False  # whether ``attend`` replaces the model's attention

    def positions(self, length: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        """Positions of a sequence of ``length`` tokens; ``generator`` is given only in training."""
        return torch.arange(length, device=device)

    def absolute(self, positions: torch.Tensor) -> torch.Tensor | None:
        return None

    def rotate(self, x: torch.Tensor, positions: torch.Tensor, key: bool) -> torch.Tensor:
        return x

    def bias_params(self) -> tuple[torch.Tensor, ...]:
        return ()

    def bias(self, params: tuple[torch.Tensor, ...], q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, layer: int
    ) -> torch.Tensor:
        """Causal attention (B, H, T, d) of layer ``layer``'s rotated q, k, v (only if ``has_attention``)."""
        raise NotImplementedError

    @torch.no_grad()
    def project(self) -> None:
        """After each optimizer step: keep constrained parameters in their domain (KERPLE's r > 0)."""


def distance(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """i - j for a block (bq, bk), clamped at 0: pairs above the causal diagonal are masked anyway,
    and the clamp keeps log/pow of negative distances (and their gradients) finite there."""
    return (q_pos[:, None] - k_pos[None, :]).clamp(min=0)
