"""Merging partial attention results by log-sum-exp (docs/design.md).

Attention over a union of disjoint key sets is exact when each part returns its softmax output O_i
and log-sum-exp lse_i:  lse = log(exp(lse_a) + exp(lse_b)),  O = O_a e^(lse_a - lse) + O_b e^(lse_b - lse).
A part with no keys for a row carries lse = -inf and contributes nothing.
"""

from __future__ import annotations

import torch


def merge_into(acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """In place: (acc_out, acc_lse) <- merge((acc_out, acc_lse), (out, lse)).

    acc_out is float32 (B, H, T, d), acc_lse (B, H, T); rows where both sides are empty stay empty
    (the -inf - -inf case is guarded so it never produces NaN).
    """
    merged = torch.logaddexp(acc_lse, lse)
    finite = merged.masked_fill(torch.isinf(merged), 0.0)
    acc_out.mul_(torch.exp(acc_lse - finite).unsqueeze(-1))
    acc_out.add_(out * torch.exp(lse - finite).unsqueeze(-1))
    acc_lse.copy_(merged)
