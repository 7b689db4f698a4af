"""Causal kernelized attention shared by ``linear``, ``performer`` and ``cosformer``.

out_i = phi_q(q_i)^T S_i / phi_q(q_i)^T z_i with S_i = sum_{j<=i} phi_k(k_j) v_j^T, z_i = sum_{j<=i} phi_k(k_j)
(Katharopoulos et al., 2020, eq. 6 and 16-20). The components differ only in their feature maps
(cosFormer's cos/sin re-weighting is a feature map too: it concatenates the cos and sin halves, so
the sum of its two linear attentions is one linear attention over 2d features). One function,
:func:`causal_linear_attention`, walks chunks of queries carrying the running sums
(:class:`KernelSums`); the recurrent decoding form (:class:`Recurrent`) is the same function on
one token at a time, so the two forms cannot drift apart.
"""

from __future__ import annotations

import torch

from longlab.lab.attention.base import AttentionModule


class KernelSums:
    """The running sums (S, z) of the keys seen so far: O(m d) per head whatever the length.

    With ``log_keys`` the keys' features arrive as logarithms and the sums are stored divided by
    exp(shift), shift being the running maximum of those logarithms (per batch row and head): exp never
    overflows, and the factor cancels exactly between numerator and denominator (the Performer code's
    stabiliser, made causal: the maximum of the keys up to the current chunk's end, not of the whole
    sequence; within a chunk it includes later keys, a constant that can only matter through ``eps``)."""

    def __init__(self) -> None:
        self.state: torch.Tensor | None = None  # (B, H, m, dv): sum phi(k) v^T
        self.norm: torch.Tensor | None = None  # (B, H, m): sum phi(k)
        self.shift: torch.Tensor | None = None  # (B, H, 1, 1): log scale of both (log_keys only)


def causal_linear_attention(
    fq: torch.Tensor,
    fk: torch.Tensor,
    v: torch.Tensor,
    chunk: int,
    eps: float,
    log_keys: bool = False,
    sums: KernelSums | None = None,
) -> torch.Tensor:
    """Causal linear attention of features fq, fk (B, H, T, m) and values v (B, H, T, dv).

    Chunks of ``chunk`` queries: inside a chunk a causal C x C product, before it the carried sums,
    so memory is O(T m + C^2 + m dv) per head and no T x T matrix exists. ``sums`` continues a
    sequence (decoding) and is updated in place; ``log_keys``: fk holds log phi(k) (see
    :class:`KernelSums`). Denominator guard: + ``eps``."""
    sums = KernelSums() if sums is None else sums
    b, h, t, m = fq.shape
    if sums.state is None:
        sums.state = torch.zeros(b, h, m, v.shape[-1], dtype=fq.dtype, device=fq.device)
        sums.norm = torch.zeros(b, h, m, dtype=fq.dtype, device=fq.device)
        if log_keys:
            sums.shift = torch.full((b, h, 1, 1), -torch.inf, dtype=fq.dtype, device=fq.device)
    outs = []
    for a in range(0, t, chunk):
        z = min(a + chunk, t)
        cq, ck, cv = fq[:, :, a:z], fk[:, :, a:z], v[:, :, a:z]
        state, norm = sums.state, sums.norm
        if log_keys:
            # the shift is a constant that cancels: no gradient flows through it
            shift = torch.maximum(sums.shift, ck.detach().amax(dim=(-2, -1), keepdim=True))
            rescale = torch.exp(sums.shift - shift)  # exp(-inf) = 0 while nothing is summed yet
            state, norm = state * rescale, norm * rescale[..., 0]
            ck = torch.exp(ck - shift)
            sums.shift = shift
        if z - a == 1:  # one token (decoding): add it to the sums, then read them; no mask needed
            sums.state, sums.norm = state + ck.transpose(-1, -2) @ cv, norm + ck[:, :, 0]
            numerator, denominator = cq @ sums.state, (cq * sums.norm[:, :, None]).sum(-1)
            outs.append(numerator / (denominator[..., None] + eps))
            continue
        inside = torch.ones(z - a, z - a, dtype=torch.bool, device=fq.device).tril()
        weights = (cq @ ck.transpose(-1, -2)).masked_fill(~inside, 0.0)  # causal, within the chunk
        numerator = weights @ cv + cq @ state
        denominator = weights.sum(-1) + (cq * norm[:, :, None]).sum(-1)
        outs.append(numerator / (denominator[..., None] + eps))
        sums.state = state + ck.transpose(-1, -2) @ cv
        sums.norm = norm + ck.sum(2)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class KernelizedAttention(AttentionModule):
    """A lab attention module defined by its feature maps: the parallel form runs
    :func:`causal_linear_attention`; :meth:`recurrent` gives the decoding form."""

    log_keys = False  # whether :meth:`features` returns log phi(k) for keys
    keeps_kv = False  # decoding carries a fixed-size state, not K/V per token

    def __init__(self, chunk: int, eps: float):
        super().__init__()
        self.chunk, self.eps = chunk, eps

    def features(self, x: torch.Tensor, positions: torch.Tensor, key: bool, length: int) -> torch.Tensor:
        """phi(x) of queries or keys x (B, H, T, d) at ``positions`` (T,) of a sequence of ``length``."""
        raise NotImplementedError

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        t = q.shape[2]
        fq, fk = self.features(q, positions, False, t), self.features(k, positions, True, t)
        return causal_linear_attention(fq, fk, v, self.chunk, self.eps, self.log_keys)

    def recurrent(self, length: int | None = None) -> Recurrent:
        """The constant-memory decoding form; ``length``: the sequence's total length, for feature maps
        that need it (cosFormer's M)."""
        return Recurrent(self, length)


class Recurrent:
    """Decoding one token at a time with the running sums only (Katharopoulos et al., 2020, eq. 18-20)."""

    def __init__(self, module: KernelizedAttention, length: int | None = None):
        self.module, self.length = module, length
        self.sums = KernelSums()
        self.position = 0

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v (B, H, d) of the next token -> its output (B, H, dv)."""
        position = torch.full((1,), self.position, dtype=torch.long, device=q.device)
        length = self.position + 1 if self.length is None else self.length
        fq = self.module.features(q[:, :, None], position, False, length)
        fk = self.module.features(k[:, :, None], position, True, length)
        out = causal_linear_attention(fq, fk, v[:, :, None], 1, self.module.eps, self.module.log_keys, self.sums)
        self.position += 1
        return out[:, :, 0]

    @property
    def state(self) -> torch.Tensor | None:
        """S, the (B, H, m, dv) sum: its size does not grow with the number of tokens."""
        return self.sums.state
