"""``longlab train``: the recipe that produces the bundled model, reproducible on a CPU.

A small Llama (``LlamaForCausalLM``) trained at a 512-token context on the standard library's text
mixed with generated long-context exercises (passkey, RULER-style needles, variable chains, word
counting) made by the same generators the evaluation uses. Batches depend only on (seed, step), so
an interrupted run resumes exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from longlab.bundled.tokenizer import train_tokenizer
from longlab.data import synthetic
from longlab.data.corpus import build_corpus, read_split, token_stream
from longlab.errors import LonglabError


@dataclass(frozen=True)
class Recipe:
    """Everything that defines the bundled model; ``longlab train`` with no options reproduces it."""

    vocab_size: int = 8192
    hidden_size: int = 256
    layers: int = 6
    heads: int = 8
    kv_heads: int = 4
    head_dim: int = 32
    intermediate_size: int = 768
    context: int = 512
    rope_theta: float = 10000.0
    batch_size: int = 16
    steps: int = 2000
    learning_rate: float = 2e-3
    final_lr_fraction: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    text_fraction: float = 0.35  # share of rows that are plain corpus text; the rest are exercises
    exercise_mix: tuple[tuple[str, float], ...] = (
        ("passkey", 0.25), ("niah", 0.2), ("kv", 0.2), ("repeat", 0.2), ("vt", 0.075), ("cwe", 0.075),
    )  # fmt: skip
    shortest_exercise: int = 96
    seed: int = 1234
    checkpoint_every: int = 100
    validate_every: int = 200
    validation_windows: int = 32


def model_config(recipe: Recipe, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.kv_heads,
        head_dim=recipe.head_dim,
        max_position_embeddings=recipe.context,
        rope_parameters={"rope_type": "default", "rope_theta": recipe.rope_theta},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


# -- data ---------------------------------------------------------------------------------------


def _answer_text(sample: synthetic.Sample) -> str:
    task = sample.meta["task"]
    if task == "vt":
        return " ".join(sample.answers)
    if task == "cwe":
        return " " + ", ".join(sample.answers)
    return f" {sample.answers[0]}."


# the passkey format the shipped checkpoint was trained on: 5-digit keys, filler in whole sentence
# groups (the evaluation's default is Landmark's: keys 1-50000, filler cut by characters)
TRAINED_PASSKEY = {"digits": 5, "garbage": "sentences"}

EXERCISES = {
    "passkey": functools.partial(synthetic.passkey, **TRAINED_PASSKEY),
    "niah": synthetic.niah_single,
    "kv": synthetic.key_value_lookup,
    "repeat": synthetic.repeated_numbers,
    "vt": synthetic.variable_tracking,
    "cwe": synthetic.common_words,
}


class Batches:
    """Training rows for step s, a pure function of (seed, s)."""

    def __init__(self, recipe: Recipe, tokenizer: PreTrainedTokenizerFast, text_tokens: np.ndarray):
        self.recipe, self.tokenizer, self.text = recipe, tokenizer, text_tokens
        self.names = [name for name, _ in recipe.exercise_mix]
        self.weights = [weight for _, weight in recipe.exercise_mix]

    def _text(self, rng: random.Random, length: int) -> list[int]:
        start = rng.randrange(0, len(self.text) - length)
        return self.text[start : start + length].tolist()

    def _exercise_row(self, rng: random.Random) -> list[int]:
        context, row = self.recipe.context, []
        while context - len(row) >= self.recipe.shortest_exercise:
            length = rng.randint(self.recipe.shortest_exercise, context - len(row))
            name = rng.choices(self.names, self.weights)[0]
            try:
                sample = EXERCISES[name](self.tokenizer, length, rng)
            except ValueError:  # too short for this task's template: the row ends in corpus text
                break
            text = sample.prompt + _answer_text(sample)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            row += ids[: context - len(row)]
        return row + self._text(rng, context - len(row)) if len(row) < context else row

    def __call__(self, step: int) -> torch.Tensor:
        rng = random.Random(self.recipe.seed * 1_000_003 + step)
        rows = [
            self._text(rng, self.recipe.context)
            if rng.random() < self.recipe.text_fraction
            else self._exercise_row(rng)
            for _ in range(self.recipe.batch_size)
        ]
        return torch.tensor(rows, dtype=torch.long, device="cpu")  # host-side data; train() moves it


def tokenize_split(tokenizer: PreTrainedTokenizerFast, corpus: Path, split: str) -> np.ndarray:
    return token_stream(tokenizer, read_split(corpus, split))


def windows(tokens: np.ndarray, length: int, count: int) -> torch.Tensor:
    """``count`` evenly spaced, non-overlapping windows of ``length`` tokens."""
    stride = max(length, (len(tokens) - length) // max(count, 1))
    starts = list(range(0, len(tokens) - length + 1, stride))[:count]
    return torch.tensor(np.stack([tokens[s : s + length] for s in starts]), dtype=torch.long, device="cpu")


# -- training -----------------------------------------------------------------------------------


def learning_rate(recipe: Recipe, step: int) -> float:
    """Linear warm-up, then cosine decay to ``final_lr_fraction`` of the peak."""
    if step < recipe.warmup_steps:
        return recipe.learning_rate * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return recipe.learning_rate * (recipe.final_lr_fraction + (1 - recipe.final_lr_fraction) * cosine)


def make_optimizer(params, recipe) -> torch.optim.Optimizer:
    """AdamW, weight decay on matrices only (``recipe``: learning_rate, weight_decay; longlab finetune too)."""
    params = list(params)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe.learning_rate, betas=(0.9, 0.95))


@torch.no_grad()
def validation_loss(model: torch.nn.Module, rows: torch.Tensor) -> float:
    model.eval()
    rows = rows.to(model.device)
    losses = [model(rows[i : i + 8], labels=rows[i : i + 8]).loss.item() for i in range(0, len(rows), 8)]
    model.train()
    return float(np.mean(losses))


def prepare(out: Path, recipe: Recipe) -> tuple[Path, PreTrainedTokenizerFast]:
    """Build the corpus and train the tokenizer once per output folder."""
    corpus = out / "corpus"
    if not (corpus / "manifest.json").exists():
        build_corpus(corpus)
    tokenizer_dir = out / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").exists():
        train_tokenizer(read_split(corpus, "train"), recipe.vocab_size).save_pretrained(tokenizer_dir)
    return corpus, PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)


def train(out: Path, recipe: Recipe = Recipe(), threads: int | None = None, device: str | torch.device = "cpu") -> Path:
    """Train (or resume) into ``out`` on ``device``; returns the folder of the final Hugging Face checkpoint.

    Weights are initialised on the CPU whatever the device, so a seed gives the same start everywhere."""
    device = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    corpus, tokenizer = prepare(out, recipe)
    text = tokenize_split(tokenizer, corpus, "train")
    validation = windows(tokenize_split(tokenizer, corpus, "validation"), recipe.context, recipe.validation_windows)
    batches = Batches(recipe, tokenizer, text)

    torch.manual_seed(recipe.seed)
    with torch.device("cpu"):  # the same initial weights on every device
        model = LlamaForCausalLM(model_config(recipe, tokenizer))
    model.to(device)
    optimizer = make_optimizer(model.parameters(), recipe)
    checkpoint = out / "checkpoint"
    start = load_state(checkpoint, model, optimizer, recipe, device)
    model.train()
    log = (out / "log.jsonl").open("a")
    bar = tqdm(range(start, recipe.steps), initial=start, total=recipe.steps, desc="train", unit="step")
    tokens_per_step = recipe.batch_size * recipe.context
    for step in bar:
        began = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(recipe, step)
        ids = batches(step).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        speed = tokens_per_step / (time.perf_counter() - began)
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{speed:.0f}")
        entry = {"step": step + 1, "loss": loss.item(), "lr": learning_rate(recipe, step), "tokens_per_s": speed}
        if (step + 1) % recipe.validate_every == 0 or step + 1 == recipe.steps:
            entry["validation_loss"] = validation_loss(model, validation)
        log.write(json.dumps(entry) + "\n")
        log.flush()
        if (step + 1) % recipe.checkpoint_every == 0 or step + 1 == recipe.steps:
            save_state(checkpoint, model, optimizer, step + 1, recipe)
    log.close()
    final = out / "final"
    model.eval()
    save_checkpoint(model, tokenizer, final)
    return final


def save_state(folder: Path, model, optimizer, step: int, recipe) -> None:
    """Write the resumable state atomically: a crash mid-write leaves the previous checkpoint intact."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "recipe": dataclasses.asdict(recipe)}  # fmt: skip
    torch.save(state, folder / "state.pt.tmp")
    (folder / "state.pt.tmp").replace(folder / "state.pt")


def load_state(folder: Path, model, optimizer, recipe, device: torch.device) -> int:
    """Resume from ``folder``'s state (as :func:`save_state` writes it): load the model and optimizer
    and return the step to continue from; 0 when there is none. A state of another recipe is refused."""
    if not (folder / "state.pt").exists():
        return 0
    state = torch.load(folder / "state.pt", weights_only=False, map_location=device)
    if state.get("recipe") != dataclasses.asdict(recipe):
        raise LonglabError(f"{folder} was trained with another recipe; use a new --out folder")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"]


def save_checkpoint(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    """A plain Hugging Face checkpoint, weights stored in float16 (loads as float32 with dtype=...)."""
    if folder.exists():
        shutil.rmtree(folder)
    model.to(torch.float16).save_pretrained(folder)
    model.to(torch.float32)
    tokenizer.save_pretrained(folder)
