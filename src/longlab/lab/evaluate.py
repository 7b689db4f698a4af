"""Length evaluations of a lab model: held-out perplexity and passkey retrieval by length."""

from __future__ import annotations

import math
import random

import numpy as np
import torch

from longlab.bundled.train import TRAINED_PASSKEY, windows
from longlab.data import synthetic
from longlab.eval.generation import token_losses


@torch.no_grad()
def perplexity(model, tokens: np.ndarray, length: int, count: int) -> dict:
    """Perplexity over ``count`` evenly spaced, non-overlapping held-out windows of ``length`` tokens
    (every token of each window scored, as Press et al. 2022 evaluate non-overlapping windows)."""
    rows = windows(tokens, length, count)
    losses = torch.cat([token_losses(model, row[None]) for row in rows])
    loss = float(losses.mean())
    return {"loss": loss, "ppl": math.exp(loss), "windows": len(rows)}


@torch.no_grad()
def passkey(model, tokenizer, length: int, samples: int, seed: int) -> dict:
    """Passkey accuracy at ``length`` tokens, in the format the lab trains on (5-digit keys, whole
    filler sentences). A sample counts when every token of the key is the model's top choice with the
    prompt and the key's earlier tokens before it -- exactly when greedy decoding writes the key --
    so one forward pass scores a sample."""
    rng = random.Random(f"lab-passkey/{seed}/{length}")
    correct = 0
    for _ in range(samples):
        sample = synthetic.passkey(tokenizer, length, rng, **TRAINED_PASSKEY)
        prompt = tokenizer(sample.prompt, add_special_tokens=False)["input_ids"]
        answer = tokenizer(" " + sample.answers[0], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + answer], device=model.device)
        hidden = model.model(ids).last_hidden_state[0, len(prompt) - 1 : -1]
        predicted = model.lm_head(hidden).argmax(-1)
        correct += bool((predicted == ids[0, len(prompt) :]).all())
    return {"accuracy": correct / samples, "samples": samples}
