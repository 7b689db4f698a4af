"""Shifted sparse attention (S²-Attn), LongLoRA's training-time attention, on longlab's kernel."""

from __future__ import annotations

from collections.abc import Callable

import torch

from longlab.errors import LonglabError

Attend = Callable[..., torch.Tensor]  # (module, q, k, v, q_pos, k_pos, key_valid) -> out, as Patch.attend


def shifted_order(length: int, group: int, device: torch.device) -> torch.Tensor:
    """Token order of the shifted heads: groups start half a group late, and the two half groups left
    over at the ends form the last group, ordered by position (the paper's roll by -G/2, with the
    wrapped group sorted so that causality follows the original positions: no token sees a later one).
    """
    half = group // 2
    return torch.cat(
        (
            torch.arange(half, length - half, device=device),
            torch.arange(0, half, device=device),
            torch.arange(length - half, length, device=device),
        )
    )


def _grouped(x: torch.Tensor, group: int) -> torch.Tensor:
    """(B, H, T, d) -> (B * T/G, H, G, d): each group of G tokens becomes a batch row."""
    b, h, t, d = x.shape
    return x.reshape(b, h, t // group, group, d).transpose(1, 2).reshape(b * (t // group), h, group, d)


def _ungrouped(x: torch.Tensor, batch: int) -> torch.Tensor:
    n, h, group, d = x.shape
    return x.reshape(batch, n // batch, h, group, d).transpose(1, 2).reshape(batch, h, -1, d)


def shifted_sparse_attention(
    attend: Attend, group: int, module: torch.nn.Module, q, k, v, q_pos, k_pos, key_valid
) -> torch.Tensor:
    """S²-Attn (Chen et al., 2023, "LongLoRA: Efficient Fine-tuning of Long-Context Large Language
    Models", section 3.2, Algorithm 1): attention only within groups of ``group`` tokens; in half of the
    heads the groups are shifted by half a group, so information flows between neighbouring groups.
    q (B, Hq, T, d), k and v (B, Hk, T, d) with T a multiple of ``group``; each group is one call of
    ``attend`` (the exact kernel), so positions, the method's rotation and the backward are unchanged.
    """
    batch, hq, length, _ = q.shape
    hk = k.shape[1]
    if length % group or group % 2:
        raise LonglabError(f"S2-Attn needs an even group size dividing the length; got group {group}, length {length}")
    if hq % 2 or hk % 2:
        raise LonglabError(f"S2-Attn shifts half the heads; the model has {hq} query and {hk} key-value heads")
    if q.shape[2] != k.shape[2]:
        raise LonglabError("S2-Attn is a training attention: queries and keys must be the same tokens (no cache)")
    q_pos = q_pos.expand(batch, length)
    valid = key_valid if key_valid is not None else torch.ones_like(q_pos, dtype=torch.bool)
    order = shifted_order(length, group, q.device)
    halves = []
    # GQA: query heads [0, Hq/2) read key-value heads [0, Hk/2), so each half keeps its own pairing
    for shift, (qs, ks, vs) in enumerate(zip(q.chunk(2, 1), k.chunk(2, 1), v.chunk(2, 1), strict=True)):
        pos, mask = q_pos, valid
        if shift:
            qs, ks, vs = (x.index_select(2, order) for x in (qs, ks, vs))
            pos, mask = q_pos.index_select(1, order), valid.index_select(1, order)
        pos_g = pos.reshape(-1, group)
        mask_g = None if key_valid is None else mask.reshape(-1, group)
        out = attend(module, _grouped(qs, group), _grouped(ks, group), _grouped(vs, group), pos_g, pos_g, mask_g)
        out = _ungrouped(out, batch)
        if shift:
            out = out.index_select(2, torch.argsort(order))
        halves.append(out)
    return torch.cat(halves, dim=1)
