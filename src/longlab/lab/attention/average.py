"""Attention over a one-pair memory (the survey's fixed-size average caches): what ``moving_average``
and ``cumulative_average`` share."""

from __future__ import annotations

import math

import torch


def attend_one_pair(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Att(q, Mem) for Mem = one (key, value) pair, q/key/value (..., d): softmax over a single score is
    1, so this returns ``value`` whatever q and key are; written out so the recurrent forms compute the
    survey's Att(q_i, Mem) literally."""
    score = (q * key).sum(-1, keepdim=True) / math.sqrt(q.shape[-1])
    return torch.softmax(score[..., None], dim=-1)[..., 0] * value
