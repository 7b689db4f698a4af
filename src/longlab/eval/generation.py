"""Scoring text with a model for evaluation: per-token losses computed without materialising the full
logits, and held-out perplexity (greedy answers are in :mod:`longlab.generation`)."""

from __future__ import annotations

import random

import numpy as np
import torch

from longlab.errors import LonglabError

POSITION_BUCKETS = 64


@torch.no_grad()
def token_losses(model, ids: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Next-token losses (T - 1,) of one sequence (1, T); logits are computed a chunk at a time."""
    ids = ids.to(model.device)
    hidden = model.model(ids).last_hidden_state[0]
    losses = []
    for start in range(0, ids.shape[1] - 1, chunk):
        logits = model.lm_head(hidden[start : min(start + chunk, ids.shape[1] - 1)]).float()
        targets = ids[0, start + 1 : start + 1 + logits.shape[0]]
        losses.append(torch.nn.functional.cross_entropy(logits, targets, reduction="none"))
    return torch.cat(losses)


def held_out_tokens(tokenizer) -> np.ndarray:
    from longlab.data.corpus import documents, split_of, token_stream

    return token_stream(tokenizer, (text for name, text in documents() if split_of(name) == "test"))


def span_start(total: int, length: int, index: int, seed: int) -> int:
    """Where sample ``index``'s span of ``2 * length`` tokens begins in ``total`` held-out tokens: a
    function of (seed, length, index) alone -- never of how many samples are asked -- so a run resumed
    with more samples measures the spans a fresh run with that count measures. Consecutive samples
    take consecutive spans from a seeded offset, wrapping around the text."""
    span = 2 * length
    room = total - span + 1  # possible starts
    offset = random.Random(f"ppl/{seed}/{length}").randrange(room)
    return (offset + index * span) % room


def perplexity_sample(model, tokens: np.ndarray, length: int, index: int, seed: int, stride_fraction: float) -> dict:
    """Whole-window and sliding-window losses of one held-out span, and the bucketed position curve."""
    span = 2 * length
    if len(tokens) < span:
        raise LonglabError(f"held-out text has {len(tokens)} tokens; ppl at length {length} needs {span}")
    start = span_start(len(tokens), length, index, seed)
    text = torch.from_numpy(tokens[start : start + span]).long()[None].to(model.device)
    whole = token_losses(model, text[:, :length])
    stride = max(1, int(length * stride_fraction))
    sliding, scored = [], 0
    for begin in range(0, span - length + 1, stride):
        losses = token_losses(model, text[:, begin : begin + length])
        fresh = losses if begin == 0 else losses[-stride:]
        sliding.append(fresh)
        scored = begin + length
    sliding_losses = torch.cat(sliding)
    buckets = [float(chunk.mean()) for chunk in torch.tensor_split(whole, POSITION_BUCKETS)]
    return {
        "tokens": length,
        "loss_whole": float(whole.mean()),
        "loss_sliding": float(sliding_losses.mean()),
        "sliding_tokens": scored,
        "position_loss": [round(b, 4) for b in buckets],
    }
