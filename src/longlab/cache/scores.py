"""Attention probabilities for eviction scores, without an (L x L) matrix.

H2O, TOVA and SnapKV score a key by the softmax probability queries give it. The probabilities
must be those the model actually uses — under the active position method, whose segments rotate
the same pair differently by distance (docs/design.md) — so each query block's logits are assembled
segment by segment (every admitted pair belongs to exactly one segment), soft-maxed over the keys,
and summed over the block's queries. Memory is one (block x keys) slab per head, never (L x L).
The same blocks fill the attention matrix a patched model returns with ``output_attentions=True``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from longlab.positions.rope import FrequencyTable, rotate
from longlab.positions.segments import Segment

QUERY_BLOCK = 64


def attention_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    key_valid: torch.Tensor,
    segments: Sequence[Segment],
    table: FrequencyTable,
    scale: float,
    block: int = QUERY_BLOCK,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """The attention probabilities of each block of queries: (start, stop, probabilities (B, Hk, G,
    stop - start, Tk) float32), one (block x keys) slab at a time.

    q (B, Hk, G, Tq, d): unrotated queries grouped by the KV head they read (G = query heads per KV
    head); k (B, Hk, Tk, d) unrotated keys; q_pos (B, Hk, Tq), k_pos and key_valid (B, Hk, Tk) —
    per head, since after eviction each head holds its own keys. Causal by position; a query that
    sees no key gets a row of zeros.
    """
    b, hk, g, tq, _ = q.shape
    k_float, q_float = k.float(), q.float()
    rotated = [_rotate_per_head(k_float[:, :, None], segment.key_map(k_pos), table)[:, :, 0] for segment in segments]
    for start in range(0, tq, block):
        stop = min(start + block, tq)
        logits = torch.full((b, hk, g, stop - start, k.shape[2]), -torch.inf, dtype=torch.float32, device=q.device)
        for segment, k_rot in zip(segments, rotated, strict=True):
            allowed = segment.admits(q_pos[:, :, start:stop], k_pos) & key_valid[:, :, None, :]  # (B, Hk, bq, Tk)
            q_rot = _rotate_per_head(q_float[:, :, :, start:stop], segment.query_map(q_pos[:, :, start:stop]), table)
            piece = torch.einsum("bhgqd,bhkd->bhgqk", q_rot, k_rot) * scale
            logits = torch.where(allowed[:, :, None], piece, logits)
        yield start, stop, torch.softmax(logits, dim=-1).nan_to_num_(0.0)  # a row seeing no key gives nothing


def attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    key_valid: torch.Tensor,
    segments: Sequence[Segment],
    table: FrequencyTable,
    scale: float,
    q_valid: torch.Tensor | None = None,
    block: int = QUERY_BLOCK,
) -> torch.Tensor:
    """Sum over the queries of their attention probabilities to each key: (B, Hk, G, Tk) float32.

    Shapes as :func:`attention_blocks`; q_valid (B, Tq) drops padding queries.
    """
    b, hk, g, _, _ = q.shape
    total = torch.zeros(b, hk, g, k.shape[2], dtype=torch.float32, device=q.device)
    for start, stop, probabilities in attention_blocks(q, k, q_pos, k_pos, key_valid, segments, table, scale, block):
        if q_valid is not None:
            probabilities *= q_valid[:, None, None, start:stop, None]
        total += probabilities.sum(dim=3)
    return total


def attention_probabilities(
    q: torch.Tensor,
    k: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    key_valid: torch.Tensor | None,
    segments: Sequence[Segment],
    table: FrequencyTable,
    scale: float,
    block: int = QUERY_BLOCK,
) -> torch.Tensor:
    """The attention matrix a model returns with ``output_attentions=True``: (B, Hq, Tq, Tk) in q's dtype.

    q (B, Hq, Tq, d) and k (B, Hk, Tk, d) unrotated, q_pos (B, Tq), k_pos and key_valid (B, Tk). The
    softmax of the method's logits (every segment's rotation, causal by position, padding keys
    excluded), filled one block of queries at a time: besides the result, only one (block x keys)
    float32 slab per head is held.
    """
    b, hq, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    if key_valid is None:
        key_valid = torch.ones(k_pos.shape, dtype=torch.bool, device=k_pos.device)
    out = torch.empty(b, hk, hq // hk, tq, tk, dtype=q.dtype, device=q.device)
    blocks = attention_blocks(q.view(b, hk, hq // hk, tq, d), k, q_pos[:, None].expand(b, hk, tq),
                              k_pos[:, None].expand(b, hk, tk), key_valid[:, None].expand(b, hk, tk),
                              segments, table, scale, block)  # fmt: skip
    for start, stop, probabilities in blocks:
        out[:, :, :, start:stop] = probabilities
    return out.view(b, hq, tq, tk)


def _rotate_per_head(x: torch.Tensor, positions: torch.Tensor, table: FrequencyTable) -> torch.Tensor:
    """Rotate x (B, Hk, G, T, d) at per-KV-head positions (B, Hk, T)."""
    b, hk, g, t, d = x.shape
    return rotate(x.reshape(b * hk, g, t, d), positions.reshape(b * hk, t), table).view(b, hk, g, t, d)
