"""Exact segmented attention with memory linear in sequence length, forward and backward.

Inputs are *unrotated* queries and keys with their positions (docs/design.md). For each segment of
the active position method the kernel walks key chunks (outer) and query blocks (inner), rotates each
piece at the segment's positions, asks the device's attention backend (:mod:`.backends`: PyTorch's
CPU flash op, cuDNN on CUDA, ...) for the piece's output and log-sum-exp, and merges the piece into
the running output by log-sum-exp. No (L x L) matrix is ever built: the only buffers are the output,
its log-sum-exp, one rotated key chunk, and block-sized temporaries.

Autograd does not differentiate correctly through a fused op's log-sum-exp, so the backward pass is
written by hand (:class:`SegmentedAttention`): it replays the same plan and calls the backend's
backward per piece with the *merged* output and log-sum-exp, which is exactly the gradient of the
merged softmax (the FlashAttention-2 backward decomposition), then un-rotates dq and dk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from longlab.attention import band
from longlab.attention.backends import CPU, Backend, backend_for
from longlab.attention.merge import merge_into
from longlab.attention.plan import CAUSAL, MASK, Layout, classify, make_layout, runs
from longlab.errors import LonglabError
from longlab.positions.rope import FrequencyTable, rotate
from longlab.positions.segments import Constant, Segment

BLOCK_SIZE = CPU.block_size  # the CPU's query block; each backend has its own


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
    check_same_device(q=q, k=k, v=v, q_pos=q_pos, k_pos=k_pos, key_valid=key_valid)
    b, tq, tk = q.shape[0], q.shape[2], k.shape[2]
    q_pos, k_pos = q_pos.expand(b, tq), k_pos.expand(b, tk)
    if key_valid is not None and bool(key_valid.all()):
        key_valid = None
    backend = backend_for(q.device, q.dtype, q.shape[-1])
    plain = len(segments) == 1 and segments[0].unbounded  # one causal call either way: the plan's single call
    if (
        block_size is None
        and not plain
        and backend.band_forward is not None
        and all(s.by_distance for s in segments)  # bands are distance ranges
        and band.is_contiguous(q_pos, k_pos, key_valid)
    ):
        schedule = band.pieces(tq, tk, segments)
    else:
        schedule = plan(q_pos, k_pos, key_valid, segments, block_size, backend)
    return SegmentedAttention.apply(q, k, v, q_pos, k_pos, key_valid, tuple(segments), table, scale, schedule, backend)


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Fail before any work, naming each tensor's device, when the inputs are not on one device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise LonglabError(f"longlab attention needs all inputs on one device; got {where}")


def plan(
    q_pos, k_pos, key_valid, segments: Sequence[Segment], block_size: int | None = None, backend: Backend | None = None
) -> Layout:
    """The block/tile layout of one call (q_pos (B, Tq), k_pos (B, Tk) already expanded to the batch)."""
    tq = q_pos.shape[1]
    if block_size is None:
        size = (backend or CPU).block_size
        # One plain segment over an unpadded sequence needs no blocking: a single causal call.
        single = len(segments) == 1 and segments[0].unbounded and key_valid is None
        block_size = tq if single and tq > size else size
    return make_layout(q_pos, k_pos, key_valid, block_size)


def _chunks(layout: Layout, backend: Backend) -> list[tuple[int, int]]:
    """Key chunks as tile ranges, as long as the backend allows (one chunk when it sets no bound)."""
    keys = backend.chunk_keys(layout.k_len)
    per_chunk = layout.n_tiles if keys is None else max(1, keys // layout.size)
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


def _walk(q, k, q_pos, k_pos, key_valid, segment: Segment, table: FrequencyTable, layout: Layout, backend: Backend):
    """For each key chunk of a segment: (k0, k1, rotated keys, iterator of its calls).

    Forward and backward replay exactly this walk; each key chunk is rotated once, each query block
    once per chunk it reads.
    """
    modes = classify(layout, segment)
    chunks = _chunks(layout, backend)
    edges = torch.tensor([start for start, _ in chunks], device="cpu")  # plan metadata lives on the host
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
    allowed = segment.admits(q_pos, k_pos)
    if key_valid is not None:
        allowed &= key_valid[:, None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, -math.inf)
    return mask[:, None], allowed.any(dim=-1)[:, None]


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32 (the flash op's lse dtype)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def partial_forward(q, k, v, q_pos, k_pos, key_valid, segments, table, scale, layout, backend: Backend | None = None):
    """Un-normalised building block: (out, lse) of q over these keys, in the accumulator dtype.

    Rows that see no key have out = 0 and lse = -inf, so results over disjoint key sets merge exactly
    with :func:`~longlab.attention.merge.merge_into` (sequence parallelism merges shards this way).
    """
    backend = backend or backend_for(q.device, q.dtype, q.shape[-1])
    b, hq, tq, dim = q.shape
    acc_dtype = accumulator_dtype(q.dtype)
    acc = torch.zeros(b, hq, tq, dim, dtype=acc_dtype, device=q.device)
    lse = torch.full((b, hq, tq), -math.inf, dtype=acc_dtype, device=q.device)
    written: set[int] = set()  # blocks holding a piece already; the first piece is copied, not merged
    for segment in segments:
        for _, _, k_rot, calls in _walk(q, k, q_pos, k_pos, key_valid, segment, table, layout, backend):
            for c in calls:
                out, piece_lse = backend.forward(
                    c.q_rot, k_rot[:, :, c.k_slice], v[:, :, c.start : c.stop], scale, c.causal, c.mask
                )
                if c.seen is not None:  # fully masked rows: each op returns its own value (0, NaN, ...)
                    piece_lse = piece_lse.masked_fill(~c.seen, -math.inf)
                    out = out.masked_fill(~c.seen[..., None], 0.0)
                if c.a in written:
                    merge_into(acc[:, :, c.a : c.z], lse[:, :, c.a : c.z], out.to(acc_dtype), piece_lse)
                else:
                    acc[:, :, c.a : c.z] = out
                    lse[:, :, c.a : c.z] = piece_lse
                    written.add(c.a)
    return acc, lse


def partial_backward(
    grad_out, q, k, v, q_pos, k_pos, key_valid, segments, table, scale, layout, out, lse, backend: Backend | None = None
):
    """Gradients (dq, dk, dv) of these keys' share of an attention whose *final* output and
    log-sum-exp over all keys are ``out`` and ``lse`` (FlashAttention-2 decomposition): summing this
    over disjoint key sets gives the exact gradient. Accumulator dtype."""
    backend = backend or backend_for(q.device, q.dtype, q.shape[-1])
    grad_out = grad_out.contiguous()
    # Rows that saw no key have lse = -inf; +inf makes every probability exp(s - lse) zero.
    lse = lse.masked_fill(torch.isneginf(lse), math.inf)
    acc_dtype = accumulator_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc_dtype, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc_dtype, device=q.device)
    for segment in segments:
        dq_rot = torch.zeros_like(dq)
        for k0, k1, k_rot, calls in _walk(q, k, q_pos, k_pos, key_valid, segment, table, layout, backend):
            dk_rot = torch.zeros(k_rot.shape, dtype=acc_dtype, device=q.device)
            for c in calls:
                gq, gk, gv = backend.backward(
                    grad_out[:, :, c.a : c.z], c.q_rot, k_rot[:, :, c.k_slice], v[:, :, c.start : c.stop],
                    out[:, :, c.a : c.z], lse[:, :, c.a : c.z], scale, c.causal, c.mask,
                )  # fmt: skip
                dq_rot[:, :, c.a : c.z] += gq
                dk_rot[:, :, c.k_slice] += gk
                dv[:, :, c.start : c.stop] += gv
            dk[:, :, k0:k1] += _rotate(dk_rot, k_pos[:, k0:k1], segment.key_map, table, inverse=True)
        dq += _rotate(dq_rot, q_pos, segment.query_map, table, inverse=True)
    return dq, dk, dv


def _single_call(q, k, q_pos, k_pos, key_valid, segments, table, layout: Layout, backend: Backend):
    """(rotated q, rotated k, causal) when the whole walk is one unmasked call over all queries and
    keys (plain prefill, decoding): the common case, answered without an accumulator."""
    if len(segments) != 1 or layout.n_blocks != 1 or len(_chunks(layout, backend)) != 1:
        return None
    (segment,) = segments
    block_runs = runs(layout, classify(layout, segment)[0], torch.zeros(1, dtype=torch.long, device="cpu"))
    if (
        len(block_runs) != 1
        or block_runs[0].mode == MASK
        or (block_runs[0].start, block_runs[0].stop) != (0, layout.k_len)
    ):
        return None
    q_rot = _rotate(q, q_pos, segment.query_map, table)
    k_rot = _rotate(k, k_pos, segment.key_map, table)
    return q_rot, k_rot, block_runs[0].mode == CAUSAL


def _piece_call(backend: Backend, piece: band.Piece, q_rot, k_rot, v, scale):
    if piece.kind == band.BAND:
        return backend.band_forward(q_rot, k_rot, v, scale, piece.window)
    return backend.forward(q_rot, k_rot, v, scale, piece.kind == band.CAUSAL, None)


def _rotated_keys(k, k_pos, segments, table) -> list[torch.Tensor]:
    return [_rotate(k, k_pos, segment.key_map, table) for segment in segments]


def _by_chunk(pieces: list[band.Piece]) -> dict[int, list[band.Piece]]:
    chunks: dict[int, list[band.Piece]] = {}
    for piece in pieces:
        chunks.setdefault(piece.a // band.ROWS, []).append(piece)
    return chunks


def band_forward(q, k, v, q_pos, k_pos, segments, table, scale, pieces: list[band.Piece], backend: Backend):
    """(out in q's dtype, lse) of a contiguous call from its band pieces, one query chunk at a time."""
    b, hq, tq, dim = q.shape
    acc_dtype = accumulator_dtype(q.dtype)
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, tq, dtype=acc_dtype, device=q.device)
    k_rots = _rotated_keys(k, k_pos, segments, table)
    for index, chunk in _by_chunk(pieces).items():
        c0, c1 = index * band.ROWS, min((index + 1) * band.ROWS, tq)
        acc = torch.zeros(b, hq, c1 - c0, dim, dtype=acc_dtype, device=q.device)
        acc_lse = torch.full((b, hq, c1 - c0), -math.inf, dtype=acc_dtype, device=q.device)
        q_rots: dict[tuple[int, int], torch.Tensor] = {}
        first = True
        for p in sorted(chunk, key=lambda p: p.a):  # a piece over the whole chunk first
            if (p.segment, p.a) not in q_rots:  # the full and causal pieces of a segment share rows
                q_rots[p.segment, p.a] = _rotate(
                    q[:, :, p.a : p.z], q_pos[:, p.a : p.z], segments[p.segment].query_map, table
                )
            piece_out, piece_lse = _piece_call(
                backend,
                p,
                q_rots[p.segment, p.a],
                k_rots[p.segment][:, :, p.start : p.stop],
                v[:, :, p.start : p.stop],
                scale,
            )
            rows = slice(p.a - c0, p.z - c0)
            if first and p.a == c0:  # the first piece over every row of the chunk is copied, not merged
                acc.copy_(piece_out)
                acc_lse.copy_(piece_lse)
            else:
                merge_into(acc[:, :, rows], acc_lse[:, :, rows], piece_out.to(acc_dtype), piece_lse.to(acc_dtype))
            first = False
        out[:, :, c0:c1] = acc
        lse[:, :, c0:c1] = acc_lse
    return out, lse


def band_backward(grad_out, q, k, v, q_pos, k_pos, segments, table, scale, pieces, backend: Backend, out, lse):
    """Gradients of :func:`band_forward` (the FlashAttention-2 decomposition, per piece)."""
    grad_out = grad_out.contiguous()
    lse = lse.masked_fill(torch.isneginf(lse), math.inf)  # rows that saw no key: every probability 0
    acc_dtype = accumulator_dtype(q.dtype)
    dq = torch.empty_like(q)
    dk_rot = [torch.zeros(k.shape, dtype=acc_dtype, device=q.device) for _ in segments]
    dv = torch.zeros(v.shape, dtype=acc_dtype, device=q.device)
    k_rots = _rotated_keys(k, k_pos, segments, table)
    for index, chunk in _by_chunk(pieces).items():
        c0, c1 = index * band.ROWS, min((index + 1) * band.ROWS, q.shape[2])
        dq_chunk = torch.zeros(*q.shape[:2], c1 - c0, q.shape[3], dtype=acc_dtype, device=q.device)
        for s, segment in enumerate(segments):
            own = [p for p in chunk if p.segment == s]
            if not own:
                continue
            a = min(p.a for p in own)
            q_rot = _rotate(q[:, :, a:c1], q_pos[:, a:c1], segment.query_map, table)
            dq_rot = torch.zeros(q_rot.shape, dtype=acc_dtype, device=q.device)
            for p in own:
                keys = slice(p.start, p.stop)
                args = (grad_out[:, :, p.a : p.z], q_rot[:, :, p.a - a : p.z - a], k_rots[s][:, :, keys],
                        v[:, :, keys], out[:, :, p.a : p.z], lse[:, :, p.a : p.z], scale)  # fmt: skip
                if p.kind == band.BAND:
                    gq, gk, gv = backend.band_backward(*args, p.window)
                else:
                    gq, gk, gv = backend.backward(*args, p.kind == band.CAUSAL, None)
                dq_rot[:, :, p.a - a : p.z - a] += gq
                dk_rot[s][:, :, keys] += gk
                dv[:, :, keys] += gv
            dq_chunk[:, :, a - c0 :] += _rotate(dq_rot, q_pos[:, a:c1], segment.query_map, table, inverse=True)
        dq[:, :, c0:c1] = dq_chunk
    dk = sum(
        _rotate(g, k_pos, segment.key_map, table, inverse=True) for g, segment in zip(dk_rot, segments, strict=True)
    )
    return dq, dk, dv


class SegmentedAttention(torch.autograd.Function):
    """Exact segmented attention with a hand-written backward. ``schedule`` is a blockwise
    :class:`~longlab.attention.plan.Layout` or, for contiguous calls, a list of band pieces."""

    @staticmethod
    def forward(ctx, q, k, v, q_pos, k_pos, key_valid, segments, table, scale, schedule, backend=None):
        backend = backend or backend_for(q.device, q.dtype, q.shape[-1])
        if isinstance(schedule, list):
            out, lse = band_forward(q, k, v, q_pos, k_pos, segments, table, scale, schedule, backend)
        elif (single := _single_call(q, k, q_pos, k_pos, key_valid, segments, table, schedule, backend)) is not None:
            q_rot, k_rot, causal = single  # nothing to merge: the backend's output is the answer
            out, lse = backend.forward(q_rot, k_rot, v, scale, causal, None)
        else:
            acc, lse = partial_forward(q, k, v, q_pos, k_pos, key_valid, segments, table, scale, schedule, backend)
            out = acc.to(q.dtype)
            del acc
        ctx.save_for_backward(q, k, v, q_pos, k_pos, key_valid, out, lse)
        ctx.plan = (segments, table, scale, schedule, backend)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, q_pos, k_pos, key_valid, out, lse = ctx.saved_tensors
        segments, table, scale, schedule, backend = ctx.plan
        if isinstance(schedule, list):
            grads = band_backward(grad_out, q, k, v, q_pos, k_pos, segments, table, scale, schedule, backend, out, lse)
        else:
            grads = partial_backward(
                grad_out, q, k, v, q_pos, k_pos, key_valid, segments, table, scale, schedule, out, lse, backend
            )
        dq, dk, dv = grads
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None, None
