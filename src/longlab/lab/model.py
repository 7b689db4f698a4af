"""The lab's model family: a small pre-norm decoder whose position encoding is a lab component.

Shaped like a transformers causal LM (``.model(ids).last_hidden_state``, ``.lm_head``, ``.device``)
so :func:`longlab.eval.generation.token_losses` scores it unchanged. A compact module of our own
rather than ``LlamaForCausalLM``: the components need hooks Llama has no place for (absolute
embeddings, an additive bias per attention block, xPos's scaled keys, random training positions).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from longlab.attention.biased import biased_attention
from longlab.lab.attention.base import AttentionModule, LabAttention
from longlab.lab.attention.full import Full
from longlab.lab.positions.base import LabPosition, ModelShape, PositionModule


@dataclass(frozen=True)
class Size:
    """Model width and depth; ``SIZES`` names the presets (docs/lab.md gives their costs)."""

    d_model: int
    layers: int
    heads: int
    mlp: int


SIZES = {
    "tiny": Size(d_model=64, layers=2, heads=4, mlp=192),
    "small": Size(d_model=256, layers=4, heads=8, mlp=768),
}


class Attention(nn.Module):
    """Projections, position rotation and output of one layer; the attention component computes the
    attention itself and says which K/V this layer projects: ``attend.kv_heads`` heads (fewer than the
    query heads for GQA/MQA; ``None``: as many) or none at all, reusing those of layer
    ``attend.kv_layer`` (CLA) from the forward pass's ``shared`` dict. The default (``Full``) is one
    fused q|k|v projection, as before: the same weights and numerics for every existing component."""

    def __init__(self, size: Size, position: PositionModule, attend: AttentionModule, layer: int = 0):
        super().__init__()
        self.attend, self.layer = attend, layer
        self.heads, self.head_dim = size.heads, size.d_model // size.heads
        self.kv_heads = attend.kv_heads or size.heads
        self.projects_kv = attend.kv_layer in (None, layer)
        kv_width = 2 * self.kv_heads * self.head_dim if self.projects_kv else 0
        self.qkv = nn.Linear(size.d_model, size.d_model + kv_width, bias=False)
        self.out = nn.Linear(size.d_model, size.d_model, bias=False)
        self.position = [position]  # shared by every layer; a list keeps it out of this layer's parameters

    def forward(self, x: torch.Tensor, positions: torch.Tensor, shared: dict | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        kv = self.kv_heads * self.head_dim if self.projects_kv else 0
        parts = self.qkv(x).split([self.heads * self.head_dim] + ([kv, kv] if kv else []), dim=-1)
        q, *kv_parts = (p.view(b, t, -1, self.head_dim).transpose(1, 2) for p in parts)  # (B, heads, T, d)
        position = self.position[0]
        q = position.rotate(q, positions, key=False)
        if self.projects_kv:
            k, v = position.rotate(kv_parts[0], positions, key=True), kv_parts[1]
            if self.attend.kv_layer is not None:  # a CLA group's first layer: later layers reuse k (rotated once), v
                shared[self.layer] = (k, v)
        else:
            k, v = shared[self.attend.kv_layer]
        if position.has_attention:  # CoPE: its positions depend on q and k
            y = position.attend(q, k, v, positions, self.layer)
        elif position.has_bias:
            y = biased_attention(q, k, v, positions, position.bias, position.bias_params())
        elif self.attend.remembers_detached:
            y = self.attend(q, k, v, positions, remembered=self._detached_kv(x, positions))
        else:
            y = self.attend(q, k, v, positions)
        return self.out(y.transpose(1, 2).reshape(b, t, -1))

    def _detached_kv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V projected (and K rotated) from the stop-gradient input: the same values as k, v, but
        gradients reach only the projection weights, never the earlier tokens' hidden states."""
        b, t, _ = x.shape
        width = self.kv_heads * self.head_dim
        kv = F.linear(x.detach(), self.qkv.weight[self.heads * self.head_dim :])
        k, v = (part.view(b, t, -1, self.head_dim).transpose(1, 2) for part in kv.split([width, width], dim=-1))
        return self.position[0].rotate(k, positions, key=True), v


class Block(nn.Module):
    def __init__(self, size: Size, shape: ModelShape, position: PositionModule, attention: LabAttention, layer: int):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(size.d_model), nn.RMSNorm(size.d_model)
        with torch.random.fork_rng(devices=[]):  # an attention's own parameters (Differential's lambdas)
            attend = attention.build(shape, layer)  # do not shift the weights every model shares
        self.attention = Attention(size, position, attend, layer)
        self.up = nn.Linear(size.d_model, 2 * size.mlp, bias=False)
        self.down = nn.Linear(size.mlp, size.d_model, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, shared: dict | None = None) -> torch.Tensor:
        x = x + self.attention(self.norm1(x), positions, shared)
        gate, up = self.up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)  # SwiGLU, as Llama


class Backbone(nn.Module):
    def __init__(self, vocab: int, size: Size, shape: ModelShape, position: PositionModule, attention: LabAttention):
        super().__init__()
        self.embed = nn.Embedding(vocab, size.d_model)
        self.position = position
        self.blocks = nn.ModuleList(Block(size, shape, position, attention, layer) for layer in range(size.layers))
        self.norm = nn.RMSNorm(size.d_model)
        # a component that changes the token stream runs the blocks itself (memory models); its own
        # parameters come from a forked stream, so every other weight stays the same under one seed
        with torch.random.fork_rng(devices=[]):
            self.runner = attention.runner(shape)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor | None = None) -> SimpleNamespace:
        if positions is None:
            positions = self.position.positions(ids.shape[1], ids.device)
        x = self.embed(ids)
        absolute = self.position.absolute(positions)
        if absolute is not None:
            x = x + absolute.to(x.dtype)
        if self.runner is not None:
            x = self.runner(x, positions, self.blocks)
        else:
            shared: dict = {}  # this forward pass's K/V that later layers reuse (CLA); freed when it returns
            for block in self.blocks:
                x = block(x, positions, shared)
        return SimpleNamespace(last_hidden_state=self.norm(x))


class LabModel(nn.Module):
    """Decoder-only LM: token embedding (+ absolute positions), pre-norm attention/SwiGLU blocks, tied
    head. ``component`` places positions; ``attention`` computes attention (default: full softmax)."""

    def __init__(
        self, vocab: int, size: Size, component: LabPosition, train_length: int, attention: LabAttention | None = None
    ):
        super().__init__()
        shape = ModelShape(size.d_model, size.heads, size.d_model // size.heads, train_length, size.layers)
        # the component's own random init draws from a forked stream, so every other weight is the
        # same for every component under one seed
        with torch.random.fork_rng(devices=[]):
            position = component.build(shape)
        self.model = Backbone(vocab, size, shape, position, attention or Full())
        self.lm_head = nn.Linear(size.d_model, vocab, bias=False)
        self.lm_head.weight = self.model.embed.weight
        nn.init.normal_(self.model.embed.weight, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def loss(self, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy of a batch (B, T)."""
        hidden = self.model(ids, positions).last_hidden_state
        logits = self.lm_head(hidden[:, :-1]).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
