"""Naive O(L^2) references written from the papers' equations, independent of longlab's kernel.

Each method is given as a relative-distance matrix rel[i, j] (what RoPE sees between query i and
key j) and a visibility matrix; the score is (R(rel_ij) q_i) . k_j, computed pair by pair in float64.
None of longlab's segments, planner or merge code is used here.
"""

from __future__ import annotations

import math

import torch


def inv_freq(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def distances(method: str, q_pos: torch.Tensor, k_pos: torch.Tensor, **p) -> tuple[torch.Tensor, torch.Tensor]:
    """(visible, rel) for positions q_pos (Tq,), k_pos (Tk,), from the paper's formula."""
    i = q_pos[:, None].double()
    j = k_pos[None, :].double()
    d = i - j
    visible = d >= 0
    if method in ("none", "frequency"):
        rel = d
    elif method == "rerope":  # Su 2023: min(i - j, w)
        rel = torch.clamp(d, max=p["window"])
    elif method == "leaky_rerope":  # i - j below w, else w + (i - j - w) / k
        w, k = p["window"], p["k"]
        rel = torch.where(d < w, d, w + (d - w) / k)
    elif method == "selfextend":  # Jin et al. 2024, eq. 3-4
        g, w = p["group"], p["window"]
        grouped = (torch.floor(i / g) + w - math.floor(w / g)) - torch.floor(j / g)
        rel = torch.where(d < w, d, grouped)
    elif method == "lm_infinite":  # Han et al. 2024: Lambda mask; global tokens' distance capped at L
        in_band = d < p["band"]
        visible = visible & (in_band | (j < p["n_global"]))
        rel = torch.where(in_band, d, torch.clamp(d, max=p["original_length"]))
    elif method == "string":  # An et al. 2024 (STRING), section 4: d below S kept, else d - S + W
        s, w = p["shift"], p["window"]
        rel = torch.where(d < s, d, d - s + w)
    elif method == "dca":  # An et al. 2024 (DCA), section 3.2: M[i][j] = P_q[i] - P_k[j] by chunk lag
        s, w = p["chunk_size"], p["local_window"]
        lag = torch.floor(i / s) - torch.floor(j / s)
        key = torch.remainder(j, s)  # P_k
        intra = torch.remainder(i, s)  # P_q^Intra
        successive = torch.clamp(torch.remainder(i, s) + s, max=s + w)  # P_q^Succ
        inter = torch.full_like(i, float(s + w))  # P_q^Inter
        query = torch.where(lag == 0, intra, torch.where(lag == 1, successive, inter))
        rel = query - key
    elif method == "sliding":
        visible = visible & (d < p["size"])
        rel = d
    else:
        raise KeyError(method)
    return visible, rel


def rotate_pairwise(q: torch.Tensor, rel: torch.Tensor, freqs: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
    """q (B, H, Tq, d) rotated by rel (Tq, Tk) -> (B, H, Tq, Tk, d), the RoPE of eq. 34 (RoFormer)."""
    angles = rel[..., None] * freqs  # (Tq, Tk, d/2)
    cos = torch.cat((angles.cos(), angles.cos()), -1) * factor
    sin = torch.cat((angles.sin(), angles.sin()), -1) * factor
    half = q.shape[-1] // 2
    q = q[:, :, :, None, :]
    rotated_half = torch.cat((-q[..., half:], q[..., :half]), -1)
    return q * cos + rotated_half * sin


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor,
    rel: torch.Tensor,
    freqs: torch.Tensor,
    scale: float,
    factor: float = 1.0,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax over visible keys of (R(rel) q) . (factor k) * scale; GQA by repeating k, v."""
    groups = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(groups, 1) * factor
    v = v.double().repeat_interleave(groups, 1)
    rotated = rotate_pairwise(q.double(), rel, freqs, factor=factor)
    scores = torch.einsum("bhqkd,bhkd->bhqk", rotated, k) * scale
    mask = visible[None, None]
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
    scores = scores.masked_fill(~mask, -math.inf)
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return probs @ v
