"""The bundled model's measured quality, and its model card, from one evaluation."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import torch

from longlab.eval import synthetic
from longlab.eval.quick import position_losses, retrieval_accuracy
from longlab.eval.scoring import first_integer_matches, string_match_all
from longlab.models.train import Recipe, tokenize_split, windows

TRAIN_LENGTHS = (128, 256, 384, 512)
BEYOND_LENGTHS = (768, 1024, 2048)


def _passkey_score(output: str, answers: list[str]) -> float:
    return first_integer_matches(output, answers[0])


def _niah_score(output: str, answers: list[str]) -> float:
    return string_match_all(output, answers) / 100


def evaluate(model, tokenizer, corpus: Path, samples: int = 50, windows_count: int = 64, seed: int = 0) -> dict:
    """Held-out perplexity and per-position loss at the training length, and retrieval accuracy at
    lengths up to and beyond it (no extension method)."""
    context = model.config.max_position_embeddings
    results: dict = {"samples_per_length": samples}
    for split in ("validation", "test"):
        rows = windows(tokenize_split(tokenizer, corpus, split), context, windows_count)
        curve = position_losses(model, rows)
        results[split] = {
            "windows": len(rows),
            "loss": float(curve.mean()),
            "perplexity": float(np.exp(curve.mean())),
            "loss_first_64": float(curve[:64].mean()),
            "loss_last_64": float(curve[-64:].mean()),
            "position_loss": [round(float(x), 4) for x in curve],
        }
    tasks = {
        "passkey": (synthetic.passkey, _passkey_score, 8),
        "niah_single": (synthetic.niah_single, _niah_score, 12),
    }
    for name, (generate, score, new_tokens) in tasks.items():
        results[name] = {
            str(length): retrieval_accuracy(
                model, tokenizer, generate, score, length, samples, seed + length, new_tokens
            )
            for length in (*TRAIN_LENGTHS, *BEYOND_LENGTHS)
        }
    return results


def training_summary(run: Path) -> dict:
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    recipe = Recipe()
    speeds = [entry["tokens_per_s"] for entry in log]
    validation = [(entry["step"], entry["validation_loss"]) for entry in log if "validation_loss" in entry]
    return {
        "steps": log[-1]["step"],
        "tokens_seen": log[-1]["step"] * recipe.batch_size * recipe.context,
        "median_tokens_per_s": float(np.median(speeds)),
        "hours": sum(recipe.batch_size * recipe.context / s for s in speeds) / 3600,
        "validation_curve": validation,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
    }
