"""Small, direct measurements used by training's final evaluation and by tests: retrieval accuracy
at a length and the per-position loss on held-out text. The full runner builds on the same pieces."""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from longlab.eval.synthetic import Sample


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations, one prompt at a time (lengths differ; no padding effects)."""
    answers = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return answers


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
    outputs = greedy_answers(model, tokenizer, [s.prompt for s in batch], max_new_tokens)
    return sum(score(out, s.answers) for out, s in zip(outputs, batch, strict=True)) / samples


@torch.no_grad()
def position_losses(model, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Mean next-token loss at each position over rows of ``windows`` (N, L) -> (L - 1,)."""
    total = torch.zeros(windows.shape[1] - 1, dtype=torch.float64)
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size]
        logits = model(ids).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        total += loss.sum(0).double()
    return total / windows.shape[0]
