"""Exact segmented attention with memory linear in sequence length, forward and backward.

Inputs are *unrotated* queries and keys with their positions (DESIGN 2.1). For each segment of the
active position method (DESIGN 2.2) the kernel walks key chunks (outer) and query blocks (inner),
rotates each piece at the segment's positions, calls PyTorch's CPU flash-attention op on it, and
merges the piece into the running output by log-sum-exp. No (L x L) matrix is ever built: the only
buffers are the output, its log-sum-exp, one rotated key chunk, and block-sized temporaries.

Autograd does not differentiate correctly through the flash op's log-sum-exp, so the backward pass
is written by hand (:class:`SegmentedAttention`): it replays the same plan and calls the flash
backward op per piece with the *merged* output and log-sum-exp, which is exactly the gradient of the
merged softmax (the FlashAttention-2 backward decomposition), then un-rotates dq and dk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from longlab.attention.merge import merge_into
from longlab.attention.plan import CAUSAL, MASK, Layout, classify, make_layout, runs
from longlab.positions.rope import FrequencyTable, rotate
from longlab.positions.segments import Constant, Segment

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

BLOCK_SIZE = 256
CHUNK_SIZE = 4096


def segmented_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    segments: Sequence[Segment],
    table: FrequencyTable,
    scale: float,
    key_valid: torch.Tensor | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """Attention of q (B, Hq, Tq, d) over k, v (B, Hk, Tk, d), Hq a multiple of Hk (GQA, no repeat).

    q_pos (B, Tq) and k_pos (B, Tk) are integer positions; the queries are the last Tq keys' tokens
    (prefill Tq = Tk, chunked prefill Tq < Tk, decoding Tq = 1). key_valid (B, Tk) marks real keys
    (False for padding). A query sees a key when 0 <= q_pos - k_pos and a segment admits the pair.
    Rows that see no key return zeros.
    """
    b, tq, tk = q.shape[0], q.shape[2], k.shape[2]
    q_pos, k_pos = q_pos.expand(b, tq), k_pos.expand(b, tk)
    if key_valid is not None and bool(key_valid.all()):
        key_valid = None
    layout = plan(q_pos, k_pos, key_valid, segments, block_size)
    return SegmentedAttention.apply(q, k, v, q_pos, k_pos, key_valid, tuple(segments), table, scale, layout)


def plan(q_pos, k_pos, key_valid, segments: Sequence[Segment], block_size: int | None = None) -> Layout:
    """The block/tile layout of one call (q_pos (B, Tq), k_pos (B, Tk) already expanded to the batch)."""
    tq = q_pos.shape[1]
    if block_size is None:
        # One plain segment over an unpadded sequence needs no blocking: a single causal call.
        single = len(segments) == 1 and segments[0].unbounded and key_valid is None
        block_size = tq if single and tq > BLOCK_SIZE else BLOCK_SIZE
    return make_layout(q_pos, k_pos, key_valid, block_size)


def _chunks(layout: Layout) -> list[tuple[int, int]]:
    """Key chunks as tile ranges; about a quarter of the keys each, at least CHUNK_SIZE keys."""
    keys = max(CHUNK_SIZE, math.ceil(layout.k_len / 4))
    per_chunk = max(1, keys // layout.size)
    return [(s, min(s + per_chunk, layout.n_tiles)) for s in range(0, layout.n_tiles, per_chunk)]


@dataclass(frozen=True)
class _Call:
    """One flash-attention call: query block [a, z), key run [start, stop) (``k_slice`` within the chunk)."""

    a: int
    z: int
    start: int
    stop: int
    k_slice: slice
    causal: bool
    q_rot: torch.Tensor
    mask: torch.Tensor | None
    seen: torch.Tensor | None


def _walk(q, k, q_pos, k_pos, key_valid, segment: Segment, table: FrequencyTable, layout: Layout):
    """For each key chunk of a segment: (k0, k1, rotated keys, iterator of its calls).

    Forward and backward replay exactly this walk; each key chunk is rotated once, each query block
    once per chunk it reads.
    """
    modes = classify(layout, segment)
    chunks = _chunks(layout)
    edges = torch.tensor([start for start, _ in chunks])
    per_block = [runs(layout, modes[i], edges) for i in range(layout.n_blocks)]
    for tile_start, tile_stop in chunks:
        k0, k1 = layout.tile(tile_start)[0], layout.tile(tile_stop - 1)[1]
        work = [(i, [r for r in block_runs if k0 <= r.start < k1]) for i, block_runs in enumerate(per_block)]
        work = [(i, block_runs) for i, block_runs in work if block_runs]
        if work:
            k_rot = _rotate(k[:, :, k0:k1], k_pos[:, k0:k1], segment.key_map, table)
            yield k0, k1, k_rot, _calls(q, q_pos, k_pos, key_valid, segment, table, layout, work, k0)


def _calls(q, q_pos, k_pos, key_valid, segment, table, layout, work, k0):
    for i, block_runs in work:
        a, z = layout.block(i)
        q_rot = _rotate(q[:, :, a:z], q_pos[:, a:z], segment.query_map, table)
        for run in block_runs:
            mask = seen = None
            if run.mode == MASK:
                valid = key_valid[:, run.start : run.stop] if key_valid is not None else None
                mask, seen = _mask(q_pos[:, a:z], k_pos[:, run.start : run.stop], valid, segment, q.dtype)
            k_slice = slice(run.start - k0, run.stop - k0)
            yield _Call(a, z, run.start, run.stop, k_slice, run.mode == CAUSAL, q_rot, mask, seen)


def _rotate(x: torch.Tensor, positions: torch.Tensor, segment_map, table: FrequencyTable, inverse=False):
    if isinstance(segment_map, Constant) and segment_map.value == 0 and table.attention_factor == 1.0:
        return x  # rotation by angle 0 with unit factor is the identity
    return rotate(x, segment_map(positions), table, inverse=inverse)


def _mask(q_pos, k_pos, key_valid, segment: Segment, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive mask (B, 1, bq, bk) and which rows see at least one key (B, 1, bq)."""
    distance = q_pos[:, :, None] - k_pos[:, None, :]
    allowed = (distance >= max(segment.min_distance, 0)) & (distance < segment.max_distance)
    if key_valid is not None:
        allowed &= key_valid[:, None, :]
    if segment.key_limit is not None:
        allowed &= (k_pos < segment.key_limit)[:, None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, -math.inf)
    return mask[:, None], allowed.any(dim=-1)[:, None]


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32 (the flash op's lse dtype)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def partial_forward(q, k, v, q_pos, k_pos, key_valid, segments, table, scale, layout):
    """Un-normalised building block: (out, lse) of q over these keys, in the accumulator dtype.

    Rows that see no key have out = 0 and lse = -inf, so results over disjoint key sets merge exactly
    with :func:`~longlab.attention.merge.merge_into` (sequence parallelism merges shards this way).
    """
    b, hq, tq, dim = q.shape
    acc_dtype = accumulator_dtype(q.dtype)
    acc = torch.zeros(b, hq, tq, dim, dtype=acc_dtype, device=q.device)
    lse = torch.full((b, hq, tq), -math.inf, dtype=acc_dtype, device=q.device)
    written: set[int] = set()  # blocks holding a piece already; the first piece is copied, not merged
    for segment in segments:
        for _, _, k_rot, calls in _walk(q, k, q_pos, k_pos, key_valid, segment, table, layout):
            for c in calls:
                out, piece_lse = _flash(
                    c.q_rot, k_rot[:, :, c.k_slice], v[:, :, c.start : c.stop], 0.0, c.causal,
                    attn_mask=c.mask, scale=scale,
                )  # fmt: skip
                if c.seen is not None:  # fully masked rows come back as lse = 0
                    piece_lse = piece_lse.masked_fill(~c.seen, -math.inf)
                if c.a in written:
                    merge_into(acc[:, :, c.a : c.z], lse[:, :, c.a : c.z], out.to(acc_dtype), piece_lse)
                else:
                    acc[:, :, c.a : c.z] = out
                    lse[:, :, c.a : c.z] = piece_lse
                    written.add(c.a)
    return acc, lse


def partial_backward(grad_out, q, k, v, q_pos, k_pos, key_valid, segments, table, scale, layout, out, lse):
    """Gradients (dq, dk, dv) of these keys' share of an attention whose *final* output and
    log-sum-exp over all keys are ``out`` and ``lse`` (FlashAttention-2 decomposition): summing this
    over disjoint key sets gives the exact gradient. Accumulator dtype."""
    grad_out = grad_out.contiguous()
    # Rows that saw no key have lse = -inf; +inf makes every probability exp(s - lse) zero.
    lse = lse.masked_fill(torch.isneginf(lse), math.inf)
    acc_dtype = accumulator_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc_dtype, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc_dtype, device=q.device)
    for segment in segments:
        dq_rot = torch.zeros_like(dq)
        for k0, k1, k_rot, calls in _walk(q, k, q_pos, k_pos, key_valid, segment, table, layout):
            dk_rot = torch.zeros(k_rot.shape, dtype=acc_dtype, device=q.device)
            for c in calls:
                gq, gk, gv = _flash_backward(
                    grad_out[:, :, c.a : c.z], c.q_rot, k_rot[:, :, c.k_slice], v[:, :, c.start : c.stop],
                    out[:, :, c.a : c.z], lse[:, :, c.a : c.z], 0.0, c.causal, attn_mask=c.mask, scale=scale,
                )  # fmt: skip
                dq_rot[:, :, c.a : c.z] += gq
                dk_rot[:, :, c.k_slice] += gk
                dv[:, :, c.start : c.stop] += gv
            dk[:, :, k0:k1] += _rotate(dk_rot, k_pos[:, k0:k1], segment.key_map, table, inverse=True)
        dq += _rotate(dq_rot, q_pos, segment.query_map, table, inverse=True)
    return dq, dk, dv


class SegmentedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_pos, k_pos, key_valid, segments, table, scale, layout):
        acc, lse = partial_forward(q, k, v, q_pos, k_pos, key_valid, segments, table, scale, layout)
        out = acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, q_pos, k_pos, key_valid, out, lse)
        ctx.plan = (segments, table, scale, layout)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, q_pos, k_pos, key_valid, out, lse = ctx.saved_tensors
        segments, table, scale, layout = ctx.plan
        dq, dk, dv = partial_backward(
            grad_out, q, k, v, q_pos, k_pos, key_valid, segments, table, scale, layout, out, lse
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None
