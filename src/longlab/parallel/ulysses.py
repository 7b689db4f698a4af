"""DeepSpeed-Ulysses: swap a sequence split for a head split, attend locally, swap back.

Jacobs et al., 2023, "DeepSpeed Ulysses: System Optimizations for Enabling Training of Extreme Long
Sequence Transformer Models". One all-to-all turns each rank's (all heads, its tokens) into (its
heads, all tokens); every rank then runs the ordinary single-process kernel on whole sequences for
H/N heads, and a second all-to-all turns the output back into (all heads, its tokens). Attention is
per head, so this is exact. Limits: the number of query heads *and* of KV heads must be divisible by
the world size (GQA KV heads are never repeated), and each rank holds the whole sequence for its heads.

torch.distributed's ``all_to_all_single`` runs on gloo and NCCL; its backward is the opposite
all-to-all, written here as two small autograd Functions so q, k and v share one message.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from longlab.attention.backends import backend_for
from longlab.attention.kernel import SegmentedAttention, check_same_device, plan
from longlab.errors import LonglabError
from longlab.method import Method
from longlab.parallel.comm import Group
from longlab.parallel.prepare import prepare
from longlab.parallel.stats import count_pairs, stats
from longlab.positions import FrequencyTable, RopeConfig
from longlab.positions.segments import Segment


def check_heads(heads: int, kv_heads: int, world: int) -> None:
    if heads % world or kv_heads % world:
        raise LonglabError(
            f"Ulysses splits attention heads over ranks: {heads} query heads and {kv_heads} KV heads must both "
            f"be divisible by the world size {world}. Use ring_attention (any head count) or a world size "
            f"that divides {kv_heads}"
        )


def _seq_to_heads(comm: Group, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each x (B, H, T, d) on every rank -> (B, H/N, N T, d): this rank's heads, all ranks' tokens in rank order."""
    n = comm.world
    send = torch.cat([x.reshape(x.shape[0], n, -1).transpose(0, 1).reshape(n, -1) for x in xs], dim=1)
    received = comm.all_to_all(send)  # row i: rank i's tokens for this rank's heads
    outs, offset = [], 0
    for x in xs:
        b, h, t, d = x.shape
        size = b * (h // n) * t * d
        part = received[:, offset : offset + size].reshape(n, b, h // n, t, d)
        outs.append(part.permute(1, 2, 0, 3, 4).reshape(b, h // n, n * t, d))
        offset += size
    return outs


def _heads_to_seq(comm: Group, ys: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each y (B, H/N, N T, d) -> (B, H, T, d): the inverse of :func:`_seq_to_heads`."""
    n = comm.world
    send = torch.cat(
        [y.reshape(y.shape[0], y.shape[1], n, -1).transpose(0, 2).transpose(1, 2).reshape(n, -1) for y in ys], dim=1
    )
    received = comm.all_to_all(send)  # row i: rank i's heads for this rank's tokens
    outs, offset = [], 0
    for y in ys:
        b, h, nt, d = y.shape
        t = nt // n
        size = b * h * t * d
        part = received[:, offset : offset + size].reshape(n, b, h, t, d)
        outs.append(part.transpose(0, 1).reshape(b, n * h, t, d))
        offset += size
    return outs


class SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, comm, *xs):
        ctx.comm = comm
        return tuple(_seq_to_heads(comm, xs))

    @staticmethod
    def backward(ctx, *grads):
        return (None, *_heads_to_seq(ctx.comm, [g.contiguous() for g in grads]))


class HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, comm, y):
        ctx.comm = comm
        return _heads_to_seq(comm, [y])[0]

    @staticmethod
    def backward(ctx, grad):
        return None, _seq_to_heads(ctx.comm, [grad.contiguous()])[0]


def ulysses_segmented_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    segments: Sequence[Segment],
    table: FrequencyTable,
    scale: float,
    key_valid: torch.Tensor | None = None,
    group: Any = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """:func:`~longlab.attention.kernel.segmented_attention` for a sequence shard, by Ulysses all-to-all.

    Same arguments as the kernel for this rank's shard of a self-attention (q and k hold the same
    tokens), with global positions. Every rank must hold the same number of tokens.
    """
    comm = Group.resolve(group)
    # before any message: a rank failing later, mid-exchange, would leave its peers waiting
    check_same_device(q=q, k=k, v=v, q_pos=q_pos, k_pos=k_pos, key_valid=key_valid)
    comm.check_device(q.device)
    batch, heads, length, _ = q.shape
    check_heads(heads, k.shape[1], comm.world)
    if k.shape[2] != length:
        raise LonglabError(f"Ulysses needs q and k over the same tokens (no KV cache); got {length} and {k.shape[2]}")
    q_pos, k_pos = q_pos.expand(batch, length), k_pos.expand(batch, length)
    valid = torch.ones_like(k_pos) if key_valid is None else key_valid.expand(batch, length).to(k_pos.dtype)
    meta = torch.tensor([batch, length], device=q.device)
    shapes = [tuple(m.tolist()) for m in comm.all_gather(meta)]
    if len(set(shapes)) != 1:
        raise LonglabError(f"every rank must hold the same (batch, tokens); got {shapes}. Split with SequenceLayout")
    gathered = torch.cat(comm.all_gather(torch.stack((q_pos, k_pos, valid))), dim=2)  # (3, B, N T) in rank order
    q_all, k_all, valid_all = gathered[0], gathered[1], gathered[2].bool()

    # The kernel's causal squares assume positions increase along the sequence; rank order does not
    # (zigzag), so sort the gathered tokens by position and undo the order on the way out.
    order = torch.argsort(q_all[0], stable=True)
    identity = bool((order == torch.arange(order.numel(), device=order.device)).all())
    if not identity:
        q_all, k_all, valid_all = q_all[:, order], k_all[:, order], valid_all[:, order]
    # Padding tokens may sit anywhere (generate() gives left padding position 1); real ones must ascend.
    ascending = all(bool((row[keep].diff() >= 0).all()) for row, keep in zip(q_all, valid_all, strict=True))
    if not (ascending and bool((q_all == k_all).all())):
        raise LonglabError(
            "Ulysses needs q and k at the same positions, and one token order in which every batch row's "
            "real tokens have increasing positions"
        )
    key_valid_all = None if bool(valid_all.all()) else valid_all

    qh, kh, vh = SeqToHeads.apply(comm, q, k, v)
    if not identity:
        qh, kh, vh = (x.index_select(2, order) for x in (qh, kh, vh))
    backend = backend_for(qh.device, qh.dtype, qh.shape[-1])
    layout = plan(q_all, k_all, key_valid_all, segments, block_size, backend)
    pairs = count_pairs(layout, segments)
    work = (batch * qh.shape[1] * pairs, q.shape[-1])
    stats().add_forward(*work)
    stats().calls += 1
    out = _CountedAttention.apply(
        qh, kh, vh, q_all, k_all, key_valid_all, tuple(segments), table, scale, layout, backend, work
    )
    if not identity:
        out = out.index_select(2, torch.argsort(order))
    return HeadsToSeq.apply(comm, out)


class _CountedAttention(torch.autograd.Function):
    """The kernel's autograd Function, also recording its backward work in :func:`stats`."""

    @staticmethod
    def forward(ctx, q, k, v, q_pos, k_pos, key_valid, segments, table, scale, layout, backend, work):
        ctx.work = work
        started = time.thread_time()
        out = SegmentedAttention.forward(ctx, q, k, v, q_pos, k_pos, key_valid, segments, table, scale, layout, backend)
        stats().forward_cpu_s += time.thread_time() - started
        return out

    @staticmethod
    def backward(ctx, grad_out):
        stats().add_backward(*ctx.work)
        started = time.thread_time()
        grads = SegmentedAttention.backward(ctx, grad_out)
        stats().backward_cpu_s += time.thread_time() - started
        return (*grads, None)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: Any = None,
    layout: str = "zigzag",
    position: str | Method = "none",
    rope: RopeConfig | None = None,
    scale: float | None = None,
    causal: bool = True,
    length: int | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """Exact causal attention for this rank's shard by DeepSpeed-Ulysses; arguments as :func:`ring_attention`.

    Query heads and KV heads must both be divisible by the world size (a :class:`LonglabError` says so).
    """
    call = prepare(q, group, layout, position, rope, scale, causal, length)
    check_heads(q.shape[1], k.shape[1], call.comm.world)
    return ulysses_segmented_attention(
        call.scaled(q),
        k,
        v,
        call.positions,
        call.positions,
        call.segments,
        call.table,
        call.scale,
        None,
        group,
        block_size,
    )
