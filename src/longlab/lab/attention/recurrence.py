"""Segment-level attention, computed for a whole sequence at once: within each segment only (the local
part of ``segment``, ``infini``, ``memorizing``), or with a stop-gradient memory of the preceding
tokens (``xl``, Transformer-XL)."""

from __future__ import annotations

import math

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


def segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment: int,
    memory: int,
    remembered: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal attention of q, k, v (B, H, T, d) cut into segments of ``segment`` tokens: a query of
    the segment starting at s sees the segment's keys up to itself and the ``memory`` keys/values
    before s (s - memory .. s - 1), read from ``remembered`` (k, v computed from stop-gradient hidden
    states, equal in value to k, v) or, without it, from k, v detached. Every segment is one
    (segment) x (memory + segment) score block, all blocks in one batched call, so memory is
    O(T (memory + segment)), never T x T."""
    if not memory:
        return in_segment_attention(q, k, v, segment)
    b, h, t, d = q.shape
    count = math.ceil(t / segment)
    pad = count * segment - t  # the last segment is padded; padded keys lie after every real query

    def segments(x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 0, 0, pad)).view(b, h, count, segment, x.shape[-1])

    qs, ks, vs = segments(q), segments(k), segments(v)
    rows = torch.arange(segment, device=q.device)
    allowed = (rows[None, :] <= rows[:, None]).expand(count, segment, segment)  # causal inside a segment

    def window(x: torch.Tensor) -> torch.Tensor:
        # zeros before the sequence, so segment n's window [n*segment - memory, n*segment) is a
        # strided slice; the pre-sequence zeros are masked out below
        padded = F.pad(x, (0, 0, memory, pad))
        return padded.unfold(2, memory, segment)[:, :, :count].transpose(-1, -2)

    # Stop-gradient (Dai et al., 2019, eq. for h~ = [SG(m), h]): the next segment reads these
    # keys/values but sends no gradient back into the tokens they came from.
    memory_k, memory_v = remembered if remembered is not None else (k.detach(), v.detach())
    ks = torch.cat([window(memory_k), ks], dim=3)
    vs = torch.cat([window(memory_v), vs], dim=3)
    starts = torch.arange(count, device=q.device) * segment
    before = starts[:, None] - memory + torch.arange(memory, device=q.device)[None, :] >= 0
    allowed = torch.cat([before[:, None, :].expand(count, segment, memory), allowed], dim=2)
    width = ks.shape[3]
    out = F.scaled_dot_product_attention(
        qs.reshape(b, h * count, segment, d),
        ks.reshape(b, h * count, width, d),
        vs.reshape(b, h * count, width, v.shape[-1]),
        attn_mask=allowed.repeat(h, 1, 1),
    )
    return out.view(b, h, count * segment, v.shape[-1])[:, :, :t]
