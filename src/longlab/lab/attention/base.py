"""What every lab attention component provides to the lab model: causal attention of q, k, v
(B, H, T, d) that the position component has already rotated; positions (T,) for those that need
them. Position biases need the full softmax (``full``): other attentions refuse a biased position.

A component that changes the token stream (memory tokens, landmark tokens) also provides a
:class:`Runner`, which takes over the model's loop over its blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from longlab.lab.positions.base import ModelShape
from longlab.method import Method


@dataclass(frozen=True)
class LabAttention(Method):
    """Base of the lab's attention components (kind ``lab-attention``)."""

    kind = "lab-attention"
    takes_bias = False  # whether an additive position bias can be added to its scores

    def build(self, shape: ModelShape, layer: int) -> AttentionModule:
        """The module of layer ``layer`` (0-based, of ``shape.layers``) of a model of ``shape``."""
        raise NotImplementedError

    def runner(self, shape: ModelShape) -> Runner | None:
        """The model-level loop of a component that changes the token stream; ``None``: the plain loop
        (every block once over the whole sequence)."""
        return None


class Runner(nn.Module):
    """Embeddings (B, T, d_model) in, last-block hidden states (B, T, d_model) out, running ``blocks``
    (each ``block(x, positions)``) however the component needs: segment by segment with a carried
    state, or over a stream with tokens inserted. The output keeps the input's length, so the loss,
    perplexity and passkey code never see the component's own tokens. Its parameters are the model's."""

    def forward(self, x: torch.Tensor, positions: torch.Tensor, blocks: nn.ModuleList) -> torch.Tensor:
        raise NotImplementedError


class AttentionModule(nn.Module):
    """Causal attention of one layer. The class attributes tell the model (``lab.model.Attention``)
    which K/V projections this layer owns; the defaults are multi-head attention's."""

    kv_heads: int | None = None  # K/V heads projected; None: one per query head (GQA/MQA set fewer)
    kv_layer: int | None = None  # CLA: the layer whose K/V this one uses (its own: it projects and shares them)
    keeps_kv = True  # whether decoding keeps K/V per token (linear attention keeps a constant state instead)
    # Transformer-XL's memory is SG(hidden states), projected: such a module also receives
    # ``remembered=(k, v)`` projected from the detached layer input, so W_k, W_v still learn through it
    remembers_detached = False

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
