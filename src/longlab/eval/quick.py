"""Small direct measurements used by training's final evaluation and by tests: retrieval accuracy
at one length and the mean loss at each position of held-out windows."""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from longlab.data.synthetic import Sample
from longlab.eval.generation import token_losses
from longlab.generation import encode, generate_answers


def retrieval_accuracy(
    model,
    tokenizer,
    generate: Callable[..., Sample],
    score: Callable[[str, list[str]], float],
    length: int,
    samples: int,
    seed: int,
    max_new_tokens: int,
) -> float:
    """Mean score (0-1) of ``samples`` prompts from ``generate`` at ``length`` tokens."""
    rng = random.Random(seed)
    batch = [generate(tokenizer, length, rng) for _ in range(samples)]
    outputs = [generate_answers(model, tokenizer, [encode(tokenizer, s.prompt)], max_new_tokens)[0] for s in batch]
    return sum(score(out, s.answers) for out, s in zip(outputs, batch, strict=True)) / samples


def position_losses(model, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss at each position over the rows of ``windows`` (N, L) -> (L - 1,)."""
    return torch.stack([token_losses(model, row[None]) for row in windows]).double().mean(0)
