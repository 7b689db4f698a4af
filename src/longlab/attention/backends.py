"""Attention backends: who computes one piece of attention, with its log-sum-exp, on each device.

The segmented kernel (plan, rotation, log-sum-exp merge, hand-written backward) is one piece of
code; a backend only answers "softmax attention of this query block over this key run, with this
additive mask or causality, returning (out, lse)", and its gradient given the *final* out and lse
(the FlashAttention-2 decomposition the kernel relies on, docs/design.md). Backends are chosen by a
table keyed by device type (like transformers' tables of RoPE init functions keyed by rope type),
then by dtype and head size: the fastest exact op that device offers for the piece.

Every op here:

- takes q (B, Hq, M, d), k and v (B, Hk, N, d) with Hq a multiple of Hk — grouped-query attention
  without repeating K and V (each op below handles the groups itself);
- treats ``causal`` as the top-left aligned triangle (query i sees keys j <= i), which the planner
  only asks for on the diagonal square where it equals position causality;
- takes ``mask`` as an additive (B, 1, M, N) mask in q's dtype (0 or -inf), or None;
- returns out in q's dtype and lse (B, Hq, M) in float32 (float64 for float64 inputs). Rows that see
  no key are patched by the kernel (out 0, lse -inf), whatever the op returned for them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from longlab.errors import LonglabError

Forward = Callable[..., tuple[torch.Tensor, torch.Tensor]]
Backward = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Backend:
    """How one device computes pieces of attention.

    ``block_size`` is the planner's query block / key tile (large on a GPU so that each call fills
    the machine; small on a CPU where pieces run one after another). ``chunk_keys`` bounds the keys
    rotated and read at once (None: all keys in one chunk, fewest merges).
    """

    name: str
    forward: Forward  # (q, k, v, scale, causal, mask) -> (out, lse)
    backward: Backward  # (grad_out, q, k, v, out, lse, scale, causal, mask) -> (dq, dk, dv)
    block_size: int
    chunk_keys: Callable[[int], int | None]
    # Bands of a contiguous call (:mod:`.band`) without masks: bottom-right aligned causality, keys
    # at most ``window`` behind the diagonal (None: all). Backends without them get blockwise plans.
    band_forward: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None  # (q, k, v, scale, window)
    band_backward: Backward | None = None  # (grad_out, q, k, v, out, lse, scale, window)

    def __str__(self) -> str:
        return self.name


# -- CPU: PyTorch's flash-attention op for the CPU ----------------------------------------------


def _cpu_forward(q, k, v, scale, causal, mask):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=mask, scale=scale
    )
    return out, lse


def _cpu_backward(grad_out, q, k, v, out, lse, scale, causal, mask):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale
    )


def _cpu_chunk_keys(k_len: int) -> int:
    # About a quarter of the keys per chunk, at least 4096: memory stays linear, calls stay long.
    return max(4096, math.ceil(k_len / 4))


# -- CUDA: cuDNN's fused attention (bf16/fp16), exact math for the rest --------------------------


def _cudnn_forward(q, k, v, scale, causal, mask):
    result = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, mask, True, 0.0, causal, scale=scale)
    return result[0], result[1].view(q.shape[:3])


def _cudnn_backward(grad_out, q, k, v, out, lse, scale, causal, mask):
    m, n = q.shape[2], k.shape[2]
    # lse goes back as the (B, H, M, 1) the forward returned; the RNG state is unused without dropout,
    # and undefined (None) sequence offsets mean "not a nested (varlen) batch"
    rng = torch.empty(0, device=q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        grad_out, q, k, v, out, lse.unsqueeze(-1).contiguous(), rng, rng, mask, None, None, m, n, 0.0, causal,
        scale=scale,
    )  # fmt: skip
    return dq, dk, dv


def _math_scores(q, k, scale, causal, mask):
    """Scores (B, Hk, G*M, N) in the accumulator dtype: query heads of one group stacked as rows, so
    keys are read once per KV head (no repeat)."""
    b, hq, m, d = q.shape
    hk, n = k.shape[1], k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    grouped = q.reshape(b, hk, (hq // hk) * m, d).to(acc)
    scores = grouped @ k.to(acc).transpose(-1, -2) * scale
    scores = scores.view(b, hk, hq // hk, m, n)
    if mask is not None:
        scores = scores + mask[:, :, None].to(acc)
    if causal:
        rows = torch.arange(m, device=q.device)[:, None]
        scores = scores.masked_fill(torch.arange(n, device=q.device)[None] > rows, -math.inf)
    return scores  # (B, Hk, G, M, N)


def _math_forward(q, k, v, scale, causal, mask):
    b, hq, m, d = q.shape
    scores = _math_scores(q, k, scale, causal, mask)
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    out = weights @ v.to(scores.dtype)[:, :, None]
    return out.reshape(b, hq, m, d).to(q.dtype), lse.reshape(b, hq, m)


def _math_backward(grad_out, q, k, v, out, lse, scale, causal, mask):
    b, hq, m, d = q.shape
    hk = k.shape[1]
    scores = _math_scores(q, k, scale, causal, mask)
    acc = scores.dtype
    grouped = (b, hk, hq // hk, m)
    p = torch.exp(scores - lse.view(*grouped)[..., None])  # lse = +inf for rows that saw no key: p = 0
    g = grad_out.to(acc).view(*grouped, d)
    dv = torch.einsum("bhgmn,bhgmd->bhnd", p, g)
    dp = g @ v.to(acc)[:, :, None].transpose(-1, -2)
    delta = (g * out.to(acc).view(*grouped, d)).sum(-1, keepdim=True)
    ds = p * (dp - delta) * scale
    dq = (ds @ k.to(acc)[:, :, None]).reshape(b, hq, m, d)
    dk = torch.einsum("bhgmn,bhgmd->bhnd", ds, q.to(acc).view(*grouped, d))
    return dq, dk, dv


# Below this many queries (decoding, short tails) a cuDNN call would first build an execution plan
# for its new shape (about 24 ms on an H100, once per key length: every decoding step is a new one).
# FlashAttention-2, PyTorch's other CUDA op with a log-sum-exp, needs no plan; masked or tiny pieces
# are cheapest as exact math.
SMALL_QUERIES = 64


def _window(window: int | None) -> dict:
    return {} if window is None else {"window_size_left": window, "window_size_right": 0}


def _flash_forward(q, k, v, scale, causal, window=None):
    """FlashAttention-2 (PyTorch's CUDA op): (B, M, H, d) layout, GQA native, causality aligned to the
    bottom-right corner, optional sliding window."""
    m, n = q.shape[2], k.shape[2]
    out, lse = torch.ops.aten._flash_attention_forward(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, m, n, 0.0, causal, False,
        scale=scale, **_window(window),
    )[:2]  # fmt: skip
    return out.transpose(1, 2), lse


def _flash_band_forward(q, k, v, scale, window):
    return _flash_forward(q, k, v, scale, True, window)


def _flash_band_backward(grad_out, q, k, v, out, lse, scale, window):
    m, n = q.shape[2], k.shape[2]
    rng = torch.zeros(2, dtype=torch.int64, device=q.device)  # read only with dropout
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        grad_out.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), out.transpose(1, 2),
        lse.contiguous(), None, None, m, n, 0.0, True, rng, rng, scale=scale, **_window(window),
    )  # fmt: skip
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def _cuda_half_forward(q, k, v, scale, causal, mask):
    if q.shape[2] > SMALL_QUERIES:
        return _cudnn_forward(q, k, v, scale, causal, mask)
    if mask is None:
        return _flash_forward(q, k, v, scale, causal)
    return _math_forward(q, k, v, scale, causal, mask)


def _cuda_half_backward(grad_out, q, k, v, out, lse, scale, causal, mask):
    if q.shape[2] > SMALL_QUERIES:
        return _cudnn_backward(grad_out, q, k, v, out, lse, scale, causal, mask)
    return _math_backward(grad_out, q, k, v, out, lse, scale, causal, mask)


def _math_chunk_keys(k_len: int) -> int:
    return 4096  # bounds the (block x keys) score slab the exact math path materialises


CPU = Backend("cpu/flash", _cpu_forward, _cpu_backward, block_size=256, chunk_keys=_cpu_chunk_keys)
CUDNN = Backend(
    "cuda/cudnn+flash", _cuda_half_forward, _cuda_half_backward, block_size=2048, chunk_keys=lambda k_len: None,
    band_forward=_flash_band_forward, band_backward=_flash_band_backward,
)  # fmt: skip
MATH = Backend("math", _math_forward, _math_backward, block_size=512, chunk_keys=_math_chunk_keys)


def _cuda(dtype: torch.dtype, head_dim: int) -> Backend:
    # cuDNN's fused kernel takes half precision and head sizes up to 128 in multiples of 8; float32
    # (what exactness tests use) and other head sizes take the exact math path.
    if dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 128:
        return CUDNN
    return MATH


# Keyed by device type; each entry picks by dtype and head size.
BACKENDS: dict[str, Callable[[torch.dtype, int], Backend]] = {
    "cpu": lambda dtype, head_dim: CPU,
    "cuda": _cuda,
    "meta": lambda dtype, head_dim: MATH,  # shape-only runs (tests that trace devices)
}


def backend_for(device: torch.device | str, dtype: torch.dtype, head_dim: int) -> Backend:
    """The backend that computes attention for tensors of this device, dtype and head size."""
    device_type = torch.device(device).type
    if device_type not in BACKENDS:
        raise LonglabError(
            f"longlab's attention runs on {', '.join(d for d in BACKENDS if d != 'meta')}; "
            f"got tensors on {device_type!r}"
        )
    return BACKENDS[device_type](dtype, head_dim)
