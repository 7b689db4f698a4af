"""Causal attention with contextual positions (CoPE), computed per (query block, key block).

CoPE (Golovneva et al., 2024, §3, eq. 3-5) gives key j, seen from query i, the position
p_ij = sum_{t=j..i} sigmoid(q_i . k_t * scale): a count of the keys between j and i, each counted as
much as the query's gate for it. The logit is (q_i . k_j + q_i . e[p_ij]) * scale, with e learned per
integer position and interpolated linearly between floor(p) and ceil(p).

p_ij is a suffix sum along the key axis, so the key blocks are walked from the diagonal block
leftwards, carrying each row's sum of the gates already seen; z[i, n] = q_i . e[n] is computed once
per query block (bq x npos) and gathered at floor(p) and ceil(p). Each key block's (out, lse) is merged
by log-sum-exp (the rule of :mod:`longlab.attention.merge`, written out of place here because
autograd goes through it). No T x T matrix is built: the forward holds block-sized temporaries.

Backward: autograd per query block under ``torch.utils.checkpoint``: the forward keeps nothing but
the block's inputs, and the backward recomputes one query block at a time, so training memory is one
query block's graph (bq x T per head), never T x T. A sequence of one query block (the lab's training
length) skips the checkpoint: its recomputed graph would be the whole graph anyway. Plain matmuls,
gathers and cumsums: every device runs it; work is in float32 (float64 for float64).
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from longlab.attention.kernel import accumulator_dtype

DEFAULT_BLOCK = 128


def contextual_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    embeddings: torch.Tensor,
    scale: float | None = None,
    block: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """Causal CoPE attention for q, k, v (B, H, T, d) and position embeddings (npos, d), shared by heads.

    Positions are clamped to npos - 1 (the paper's code). Returns (B, H, T, d) in v's dtype.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    work = accumulator_dtype(q.dtype)
    q, k, v, embeddings = (x.to(work) for x in (q, k, v, embeddings))
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, embeddings))
    checkpointed = grad and q.shape[2] > block  # one block: checkpointing would only add a recompute
    outs = []
    for start in range(0, q.shape[2], block):
        end = min(start + block, q.shape[2])
        args = (q[:, :, start:end], k[:, :, :end], v[:, :, :end], embeddings, start, scale, block)
        outs.append(checkpoint(_query_block, *args, use_reentrant=False) if checkpointed else _query_block(*args))
    return torch.cat(outs, dim=2).to(v.dtype)


def _query_block(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, embeddings: torch.Tensor, start: int, scale: float, block: int
) -> torch.Tensor:
    """Rows start .. start + bq of the output; k and v hold keys 0 .. start + bq (the causal prefix)."""
    top = embeddings.shape[0] - 1
    rows = torch.arange(start, start + q.shape[2], device=q.device)
    z = q @ embeddings.T  # (B, H, bq, npos): q_i . e[n] for every integer position n
    carry = q.new_zeros(q.shape[:3])  # per row: sum of the gates of the keys right of this block
    out = lse = None
    for first in reversed(range(0, k.shape[2], block)):  # the diagonal block first
        last = min(first + block, k.shape[2])
        cols = torch.arange(first, last, device=q.device)
        causal = cols[None, :] <= rows[:, None]  # (bq, bk)
        qk = q @ k[:, :, first:last].transpose(-1, -2)
        gates = torch.where(causal, torch.sigmoid(qk * scale), 0.0)
        position = (gates.flip(-1).cumsum(-1).flip(-1) + carry[..., None]).clamp(max=top)  # eq. 3
        carry = carry + gates.sum(-1)
        # eq. 5: linear interpolation between the integer positions around p; the weight is
        # differentiable in p (so the gates learn), the indices are not
        floor = position.detach().floor()
        low = z.gather(-1, floor.long())
        high = z.gather(-1, position.detach().ceil().long())
        pos_logit = low + (position - floor) * (high - low)
        logits = torch.where(causal, (qk + pos_logit) * scale, -math.inf)
        block_lse = logits.logsumexp(-1)
        block_out = torch.exp(logits - block_lse[..., None]) @ v[:, :, first:last]
        if out is None:  # the diagonal block: every row sees at least its own key, so lse is finite
            out, lse = block_out, block_lse
            continue
        merged = torch.logaddexp(lse, block_lse)
        out = out * torch.exp(lse - merged)[..., None] + block_out * torch.exp(block_lse - merged)[..., None]
        lse = merged
    return out
