"""Ring attention: each rank keeps its queries while key/value blocks travel around a ring.

Liu, Zaharia & Abbeel, 2023, "Ring Attention with Blockwise Transformers for Near-Infinite Context".
With N ranks, step s gives rank r the K/V block of rank r - s; the rank computes its queries against
that block with the segmented kernel's :func:`~longlab.attention.kernel.partial_forward` and merges
the partial (out, lse) by log-sum-exp, while the next block is already in flight (the send/receive
for step s + 1 is posted before step s computes).

Exactness. The key sets of the N blocks are disjoint and cover the sequence, and the log-sum-exp
merge of attention over disjoint key sets is exact (``longlab.attention.merge``), so the forward is
the single-process attention up to float rounding order. The backward uses the FlashAttention-2
decomposition: with the *final* out and lse, each block's share of dq, dk, dv is
:func:`~longlab.attention.kernel.partial_backward`, and the shares over disjoint key sets sum to the
exact gradient. K/V go around the ring a second time; a dK/dV accumulator travels with each block,
collects every rank's share and arrives back at its owner after N hops.

Positions are global and keys travel *unrotated* with their positions (gathered once per call, they
are small), so every position method of the core engine works unchanged: each rank rotates a block
at whatever positions its segments assign, and keys in a query's future are skipped by the planner.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from longlab.attention.backends import Backend, backend_for
from longlab.attention.kernel import accumulator_dtype, check_same_device, partial_backward, partial_forward, plan
from longlab.attention.merge import merge_into
from longlab.errors import LonglabError
from longlab.method import Method
from longlab.parallel.comm import DKV_TAG, KV_TAG, Group, pack, unpack
from longlab.parallel.prepare import prepare
from longlab.parallel.stats import count_pairs, stats
from longlab.positions import FrequencyTable, RopeConfig
from longlab.positions.segments import Segment

Block = tuple[torch.Tensor, torch.Tensor | None]  # (k_pos (B, Tk), key_valid (B, Tk) or None) of one rank


def gather_key_positions(
    comm: Group, k: torch.Tensor, k_pos: torch.Tensor, key_valid: torch.Tensor | None
) -> list[Block]:
    """Every rank's key positions and padding mask (one small all-gather), after checking shapes agree."""
    batch, _, length, _ = k.shape
    meta = torch.tensor([batch, length, k.shape[1], k.shape[3]], device=k.device)
    shapes = [tuple(m.tolist()) for m in comm.all_gather(meta)]
    if len(set(shapes)) != 1:
        lengths = [s[1] for s in shapes]
        raise LonglabError(
            f"every rank must hold K/V of the same shape (batch, kv_heads, len, head_dim); got {shapes} "
            f"(shard lengths {lengths}). Split the sequence with longlab.parallel.SequenceLayout, which pads it"
        )
    valid = torch.ones_like(k_pos) if key_valid is None else key_valid.to(k_pos.dtype)
    blocks = []
    for part in comm.all_gather(torch.stack((k_pos, valid))):
        mask = part[1].bool()
        blocks.append((part[0], None if bool(mask.all()) else mask))
    return blocks


def _plan(q_pos, block: Block, segments, block_size, own: bool, backend: Backend):
    # The own block may use the kernel's default (one causal call for plain attention); any other
    # block is planned in fixed blocks of the backend's size (small on a CPU, large on a GPU) so
    # that an off-diagonal block never needs a (Tq x Tk) mask.
    size = block_size if block_size is not None or own else backend.block_size
    return plan(q_pos, block[0], block[1], segments, size, backend)


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_pos, blocks, segments, table, scale, comm, block_size):
        world, rank = comm.world, comm.rank
        heads_batch = q.shape[0] * q.shape[1]
        backend = backend_for(q.device, q.dtype, q.shape[-1])
        acc = lse = None
        layouts = []
        buffer, kb, vb = (pack(k, v) if world > 1 else None), k, v
        for step in range(world):
            # Post the next hop before computing on this block: transfer overlaps compute.
            pending = comm.ring_exchange(buffer, KV_TAG, "kv") if step + 1 < world else None
            owner = (rank - step) % world
            layout = _plan(q_pos, blocks[owner], segments, block_size, owner == rank, backend)
            pairs = count_pairs(layout, segments)
            layouts.append((layout, pairs))
            if pairs:
                stats().add_forward(heads_batch * pairs, q.shape[-1])
                k_pos_b, valid_b = blocks[owner]
                started = time.thread_time()
                out, piece_lse = partial_forward(
                    q, kb, vb, q_pos, k_pos_b, valid_b, segments, table, scale, layout, backend
                )
                if acc is None:
                    acc, lse = out, piece_lse
                else:
                    merge_into(acc, lse, out, piece_lse)
                stats().forward_cpu_s += time.thread_time() - started
            if pending is not None:
                buffer = pending.wait()
                kb, vb = unpack(buffer, k.shape, v.shape)
        if acc is None:  # no query sees any key (cannot happen for a causal self-attention shard)
            acc_dtype = accumulator_dtype(q.dtype)
            acc = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
            lse = torch.full(q.shape[:3], float("-inf"), dtype=acc_dtype, device=q.device)
        out = acc.to(q.dtype)
        stats().calls += 1
        ctx.save_for_backward(q, k, v, q_pos, out, lse)
        ctx.plan = (blocks, segments, table, scale, comm, layouts, backend)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, q_pos, out, lse = ctx.saved_tensors
        blocks, segments, table, scale, comm, layouts, backend = ctx.plan
        world, rank = comm.world, comm.rank
        heads_batch = q.shape[0] * q.shape[1]
        dq = None
        kb, vb = k, v
        kv_buffer = pack(k, v) if world > 1 else None
        arriving = None  # the dK/dV accumulator of this step's block, sent by the previous rank
        for step in range(world):
            pending = comm.ring_exchange(kv_buffer, KV_TAG, "kv") if step + 1 < world else None
            owner = (rank - step) % world
            layout, pairs = layouts[step]
            k_pos_b, valid_b = blocks[owner]
            if pairs:
                stats().add_backward(heads_batch * pairs, q.shape[-1])
                started = time.thread_time()
                dq_b, dk_b, dv_b = partial_backward(
                    grad_out, q, kb, vb, q_pos, k_pos_b, valid_b, segments, table, scale, layout, out, lse, backend
                )
                stats().backward_cpu_s += time.thread_time() - started
                dq = dq_b if dq is None else dq.add_(dq_b)
                share = pack(dk_b, dv_b)
            else:
                acc_dtype = accumulator_dtype(q.dtype)
                share = torch.zeros(k.numel() + v.numel(), dtype=acc_dtype, device=q.device)
            if arriving is not None:
                share.add_(arriving.wait())
            # The accumulator moves on with its block; after the last step it reaches the owner.
            arriving = comm.ring_exchange(share, DKV_TAG, "dkv") if world > 1 else None
            if pending is not None:
                kv_buffer = pending.wait()
                kb, vb = unpack(kv_buffer, k.shape, v.shape)
        own = arriving.wait() if arriving is not None else share
        dk, dv = unpack(own, k.shape, v.shape)
        if dq is None:
            dq = torch.zeros(q.shape, dtype=dk.dtype, device=q.device)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None


def ring_segmented_attention(
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
    """:func:`~longlab.attention.kernel.segmented_attention` for a sequence shard, by ring attention.

    Same arguments as the single-process kernel, for this rank's shard: q (B, Hq, Tq, d), k/v
    (B, Hk, Tk, d) with Hq a multiple of Hk, and *global* positions q_pos (B, Tq), k_pos (B, Tk); every
    rank of ``group`` must call it with K/V of the same shape. Each rank's positions must increase
    along the shard (as the kernel assumes for its causal squares); the table must be the one for the
    global sequence.
    """
    comm = Group.resolve(group)
    # before any message: a rank failing later, mid-ring, would leave its peers waiting
    check_same_device(q=q, k=k, v=v, q_pos=q_pos, k_pos=k_pos, key_valid=key_valid)
    comm.check_device(q.device)
    batch = q.shape[0]
    q_pos, k_pos = q_pos.expand(batch, q.shape[2]), k_pos.expand(batch, k.shape[2])
    if key_valid is not None:
        key_valid = key_valid.expand(batch, k.shape[2])
    blocks = gather_key_positions(comm, k, k_pos, key_valid)
    return RingAttention.apply(q, k, v, q_pos, blocks, tuple(segments), table, scale, comm, block_size)


def ring_attention(
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
    """Exact causal attention for this rank's shard of a sequence split over ``group`` (default group).

    q (B, Hq, local_len, d), k/v (B, Hk, local_len, d) in the SDPA layout, *unrotated*; the shard is
    rank r's part of the global sequence under ``layout`` (``"zigzag"`` or ``"contiguous"``, see
    :class:`~longlab.parallel.SequenceLayout`), which gives its global positions. ``position`` is any
    longlab method spec or object (``"yarn:factor=4"``, ``"selfextend"``, ``"rerope+logn"``),
    resolved with ``rope`` (default: plain RoPE base 10000, L_train 4096). ``length`` is the real
    global length when the sequence was padded to split (default: local_len x world, no padding).
    ``scale`` defaults to 1/sqrt(d). Returns (B, Hq, local_len, d); differentiable.
    """
    call = prepare(q, group, layout, position, rope, scale, causal, length)
    return ring_segmented_attention(
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
