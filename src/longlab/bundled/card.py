"""The bundled model's measured quality, and its model card, from one evaluation."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import torch

from longlab.bundled.train import Recipe, tokenize_split, windows
from longlab.data import synthetic
from longlab.eval.quick import position_losses, retrieval_accuracy
from longlab.eval.scoring import first_integer_matches, string_match_all

TRAIN_LENGTHS = (160, 256, 384, 512)
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


def training_summary(run: Path, recipe: Recipe) -> dict:
    """Steps, tokens, time and the validation curve from the run's log (last entry per step counts)."""
    by_step = {}
    for line in (run / "log.jsonl").read_text().splitlines():
        entry = json.loads(line)
        by_step[entry["step"]] = entry
    log = [by_step[step] for step in sorted(by_step)]
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


def model_card(recipe: Recipe, training: dict, results: dict, manifest: dict) -> str:
    """The model card (the checkpoint's README.md), every figure taken from the measurements."""
    parameters = training.get("parameters", 0)
    mix = ", ".join(f"{name} {share:.0%}" for name, share in recipe.exercise_mix)
    exercise_share = 1 - recipe.text_fraction
    validation, test = results["validation"], results["test"]

    def row(task: str) -> str:
        return " | ".join(f"{results[task][str(n)]:.0%}" for n in (*TRAIN_LENGTHS, *BEYOND_LENGTHS))

    lengths = " | ".join(str(n) for n in (*TRAIN_LENGTHS, *BEYOND_LENGTHS))
    counts = {s: sum(d["split"] == s for d in manifest["documents"]) for s in manifest["totals"]}
    curve = training["validation_curve"]
    return f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
---

# longlab tiny

A {parameters / 1e6:.1f} M-parameter Llama (`LlamaForCausalLM`) trained from scratch by longlab at a context of
**{recipe.context} tokens** — the situation context-extension methods exist for — on the text every Python
installation carries, mixed with generated long-context exercises. It is longlab's default model: every
command runs on it on a laptop CPU with no download. Rebuild it with `longlab train`.

## Architecture

| | |
|---|---|
| layers | {recipe.layers} |
| hidden size / MLP size | {recipe.hidden_size} / {recipe.intermediate_size} |
| attention heads / KV heads / head dim | {recipe.heads} / {recipe.kv_heads} (GQA) / {recipe.head_dim} |
| RoPE base / max positions | {recipe.rope_theta:g} / {recipe.context} |
| vocabulary | {recipe.vocab_size} byte-level BPE, digits split into single tokens |
| embeddings | tied input/output |
| parameters | {parameters:,} |
| storage | float16 safetensors |

## Data

`longlab corpus` (Python {manifest["python"]}): the standard library's `.py` sources (without test suites, IDLE,
turtledemo, ensurepip and the `encodings` tables) and the reference manual's topics (`pydoc_data.topics`),
split by a hash of each document's name: train {counts["train"]} documents ({manifest["totals"]["train"]:,}
characters), validation {counts["validation"]} ({manifest["totals"]["validation"]:,}), test {counts["test"]}
({manifest["totals"]["test"]:,}). The file list with sha256 of every document is `corpus-manifest.json` beside
this card.

Each training row is either a {recipe.context}-token window of the training text ({recipe.text_fraction:.0%} of
rows) or a row packed with generated exercises ({exercise_share:.0%}): {mix}. The exercises come from the same
generators the evaluation uses (`longlab.data.synthetic`): passkey lines in filler (Landmark format), RULER
single needles, dense key-value lookups, repeated number lists, variable-assignment chains and word
counting, at lengths from {recipe.shortest_exercise} to {recipe.context} tokens with needles uniform over the window.

## Recipe

AdamW (β = 0.9, 0.95; weight decay {recipe.weight_decay} on matrices), peak learning rate {recipe.learning_rate},
{recipe.warmup_steps} warm-up steps then cosine decay to {recipe.final_lr_fraction:.0%}, gradient clipping
{recipe.grad_clip}, batch {recipe.batch_size} × {recipe.context} tokens, {training["steps"]} steps
(**{training["tokens_seen"] / 1e6:.1f} M tokens**), bf16 autocast on CPU, seed {recipe.seed}. Training took
**{training["hours"]:.2f} hours** on {training["machine"]} (median {training["median_tokens_per_s"]:,.0f}
tokens/s). Validation loss during training (step, loss): {", ".join(f"{s}: {v:.3f}" for s, v in curve)}.

## Measured quality (held-out data, {results["samples_per_length"]} samples per length)

Held-out perplexity at {recipe.context} tokens ({validation["windows"]} windows each): validation
**{validation["perplexity"]:.2f}** (loss {validation["loss"]:.3f}), test **{test["perplexity"]:.2f}**
(loss {test["loss"]:.3f}). Mean loss over the first 64 positions of the window {validation["loss_first_64"]:.3f},
over the last 64 **{validation["loss_last_64"]:.3f}**: the model uses its context.

Retrieval accuracy by input length (tokens, template and answer budget included), no extension method:

| task | {lengths} |
|---|{"---|" * (len(TRAIN_LENGTHS) + len(BEYOND_LENGTHS))}
| passkey (Landmark format, keys 1–50000) | {row("passkey")} |
| RULER niah_single_1 (7 digits) | {row("niah_single")} |

Beyond {recipe.context} tokens, with plain RoPE, retrieval collapses: that is the baseline the extension
methods are measured against (`longlab eval`).

## Limits

A model this size knows no world facts and writes only Python-flavoured text; it answers the synthetic
long-context formats it was trained on and little else. Its numbers are for comparing methods against each
other on the same weights, not for comparing with published models. Trained on one Python version's
standard library: other versions change the corpus (the manifest records exactly which files were used).
"""


def finish(run: Path, recipe: Recipe, samples: int = 50) -> dict:
    """Evaluate a run's final checkpoint and write eval.json, the corpus manifest and the model card into it."""
    from longlab.loading import load

    final = run / "final"
    model, tokenizer = load(final)
    results = evaluate(model, tokenizer, run / "corpus", samples=samples)
    training = {**training_summary(run, recipe), "parameters": sum(p.numel() for p in model.parameters())}
    manifest = json.loads((run / "corpus" / "manifest.json").read_text())
    (final / "eval.json").write_text(json.dumps({"training": training, **results}, indent=1))
    (final / "corpus-manifest.json").write_text(json.dumps(manifest, indent=1))
    (final / "README.md").write_text(model_card(recipe, training, results, manifest))
    return results
