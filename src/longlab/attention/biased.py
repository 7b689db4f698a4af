"""Causal attention with an additive position bias computed per (query block, key block).

Relative position biases (ALiBi, T5 buckets, KERPLE, Sandwich, FIRE) are a function of the query's
and the key's positions. Building the whole (L x L) bias would cost O(L^2) memory, so this kernel
walks query blocks (outer) and key blocks (inner, causal blocks only), asks ``bias_fn`` for the
block's bias, and merges each block's (out, lse) by log-sum-exp (:func:`~longlab.attention.merge.merge_into`,
docs/design.md). Memory: the output, its log-sum-exp and block-sized temporaries.

The bias may have learnable parameters (T5's bucket table, KERPLE's r1/r2, FIRE's MLP). Autograd
cannot see through the block loop without storing every block, so the backward is written by hand
(FlashAttention-2 decomposition): per block it recomputes the scores with the *final* lse,
dS = P * (dO V^T - rowsum(dO * O)), and sends dS (summed over the batch) through the bias block's
own small autograd graph to the parameters. ``torch.autograd.gradcheck`` checks it on float64
(tests/lab/test_biased_kernel.py).

Plain matmuls only, so every device runs it; accumulation is in float32 (float64 for float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from longlab.attention.kernel import accumulator_dtype
from longlab.attention.merge import merge_into

# (params, q_pos (bq,), k_pos (bk,)) -> bias (H or 1, bq, bk), differentiable in params
BiasFn = Callable[[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor], torch.Tensor]

DEFAULT_BLOCK = 128


def biased_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    bias_fn: BiasFn,
    params: tuple[torch.Tensor, ...] = (),
    scale: float | None = None,
    block: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """Causal softmax(q k^T * scale + bias) v for q, k, v (B, H, T, d) and positions (T,).

    Causality is by index (query i sees keys j <= i); ``positions`` only feed the bias, so they may
    be any increasing integers (randomized training positions). ``params`` are the bias's learnable
    tensors: their gradients come back through the hand-written backward.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return _BiasedAttention.apply(q, k, v, positions, bias_fn, scale, block, *params)


def _blocks(length: int, block: int) -> list[tuple[int, int]]:
    return [(a, min(a + block, length)) for a in range(0, length, block)]


def _scores(q_blk, k_blk, bias, scale, a, c):
    """Scores of one block in the accumulator dtype, -inf above the causal diagonal."""
    s = torch.matmul(q_blk, k_blk.transpose(-1, -2)) * scale + bias
    bq, bk = q_blk.shape[-2], k_blk.shape[-2]
    if c + bk - 1 > a:  # the block reaches past some query's own index: mask the future
        rows = torch.arange(a, a + bq, device=q_blk.device)[:, None]
        cols = torch.arange(c, c + bk, device=q_blk.device)[None, :]
        s = s.masked_fill(cols > rows, -math.inf)
    return s


class _BiasedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, positions, bias_fn, scale, block, *params):
        acc_dtype = accumulator_dtype(q.dtype)
        b, h, t, _ = q.shape
        out = torch.zeros(b, h, t, v.shape[-1], dtype=acc_dtype, device=q.device)
        lse = torch.full((b, h, t), -math.inf, dtype=acc_dtype, device=q.device)
        qa, ka, va = q.to(acc_dtype), k.to(acc_dtype), v.to(acc_dtype)
        with torch.no_grad():
            for a, z in _blocks(t, block):
                for c, e in _blocks(z, block):  # causal: key blocks that start before the query block ends
                    bias = bias_fn(params, positions[a:z], positions[c:e]).to(acc_dtype)
                    s = _scores(qa[:, :, a:z], ka[:, :, c:e], bias, scale, a, c)
                    piece_lse = torch.logsumexp(s, dim=-1)
                    p = torch.exp(s - piece_lse[..., None])
                    merge_into(out[:, :, a:z], lse[:, :, a:z], torch.matmul(p, va[:, :, c:e]), piece_lse)
        ctx.save_for_backward(q, k, v, positions, out, lse, *params)
        ctx.bias_fn, ctx.scale, ctx.block = bias_fn, scale, block
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, positions, out, lse, *params = ctx.saved_tensors
        bias_fn, scale, block = ctx.bias_fn, ctx.scale, ctx.block
        acc_dtype = out.dtype
        qa, ka, va, go = q.to(acc_dtype), k.to(acc_dtype), v.to(acc_dtype), grad_out.to(acc_dtype)
        dq, dk, dv = torch.zeros_like(qa), torch.zeros_like(ka), torch.zeros_like(va)
        delta = (go * out).sum(-1, keepdim=True)  # rowsum(dO * O): the softmax Jacobian's shared term
        leaves = [p.detach().requires_grad_(p.requires_grad) for p in params]
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        dparams = [torch.zeros_like(leaf) for leaf in wanted]
        t = q.shape[2]
        for a, z in _blocks(t, block):
            for c, e in _blocks(z, block):
                with torch.enable_grad():
                    bias = bias_fn(tuple(leaves), positions[a:z], positions[c:e])
                s = _scores(qa[:, :, a:z], ka[:, :, c:e], bias.detach().to(acc_dtype), scale, a, c)
                p = torch.exp(s - lse[:, :, a:z, None])
                dv[:, :, c:e] += torch.matmul(p.transpose(-1, -2), go[:, :, a:z])
                dp = torch.matmul(go[:, :, a:z], va[:, :, c:e].transpose(-1, -2))
                ds = p * (dp - delta[:, :, a:z])
                dq[:, :, a:z] += torch.matmul(ds, ka[:, :, c:e]) * scale
                dk[:, :, c:e] += torch.matmul(ds.transpose(-1, -2), qa[:, :, a:z]) * scale
                if wanted and bias.requires_grad:
                    dbias = ds.sum_to_size(bias.shape).to(bias.dtype)
                    grads = torch.autograd.grad(bias, wanted, dbias, allow_unused=True)
                    for total, g in zip(dparams, grads, strict=True):
                        if g is not None:
                            total += g
        it = iter(dparams)
        grads_params = [next(it) if leaf.requires_grad else None for leaf in leaves]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, *grads_params
