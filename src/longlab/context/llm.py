"""Asking the model: text prompts in, greedy answers out (through ``longlab.generation``), and the
model's mean log-probability of an answer (map_rerank's score)."""

from __future__ import annotations

import math

import torch

from longlab.generation import encode, generate_answers


def complete(
    model, tokenizer, prompts: list[str], new_tokens: int, first_line: bool, chat: bool = False, batch: int = 8
) -> list[str]:
    """Greedy answers to text prompts, ``batch`` prompts per generate() call."""
    answers: list[str] = []
    for start in range(0, len(prompts), batch):
        encoded = [encode(tokenizer, p, chat) for p in prompts[start : start + batch]]
        answers += generate_answers(model, tokenizer, encoded, new_tokens, first_line)
    return answers


@torch.no_grad()
def answer_logprob(model, tokenizer, prompt: str, answer: str, chat: bool = False) -> float:
    """Mean log-probability per token of ``answer`` following ``prompt`` (-inf for an empty answer:
    nothing was said, so nothing ranks below it)."""
    answer_ids = tokenizer(answer, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if answer_ids.shape[1] == 0:
        return -math.inf
    prompt_ids = encode(tokenizer, prompt, chat)
    ids = torch.cat([prompt_ids, answer_ids], dim=1).to(model.device)
    logits = model(input_ids=ids, use_cache=False).logits[0, prompt_ids.shape[1] - 1 : -1].float()
    targets = ids[0, prompt_ids.shape[1] :]
    return float(logits.log_softmax(-1).gather(-1, targets[:, None]).mean())
