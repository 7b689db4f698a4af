"""``longlab lab``: train one small model per component on the same data, tokens and seed, then
measure each by length; append every result as a JSON line (never rewritten) and write report.md.

Resumable per model: training checkpoints every ``checkpoint_every`` steps and a finished model's
weights stay in ``models/<component>/``; a rerun skips every (component, measurement) already in
``results.jsonl``. Deterministic: weights start from the same seed for every component, and batch s
is a pure function of (seed, s) (the bundled model's :class:`~longlab.bundled.train.Batches`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from longlab.bundled.tokenizer import train_tokenizer
from longlab.bundled.train import Batches, Recipe, learning_rate, load_state, make_optimizer, save_state
from longlab.data.corpus import build_corpus, read_split, token_stream
from longlab.errors import LonglabError
from longlab.eval import memory
from longlab.eval.plots import slug
from longlab.lab import evaluate
from longlab.lab.components import model_spec, spec_name
from longlab.lab.kv_bytes import kv_bytes_per_token
from longlab.lab.model import SIZES, LabModel
from longlab.lab.presets import PRESETS
from longlab.loading import model_path

MULTIPLES = (1, 2, 4, 8, 16)  # evaluation lengths, in training lengths


@dataclass(frozen=True)
class LabConfig:
    """One lab run. The defaults are the documented CPU configuration (docs/lab.md)."""

    preset: str = "positions"
    components: tuple[str, ...] = ()  # empty: the preset's
    size: str = "tiny"
    vocab_size: int = 1024  # a byte-level BPE trained on the corpus; 0: the bundled model's (8192)
    length: int = 128
    steps: int = 600
    batch_size: int = 8
    learning_rate: float = 5e-3
    warmup_steps: int = 20
    seed: int = 1234
    ppl_windows: int = 2
    passkey_samples: int = 4
    multiples: tuple[int, ...] = MULTIPLES
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise LonglabError(f"unknown lab preset {self.preset!r}; known: {', '.join(PRESETS)}")
        if self.size not in SIZES:
            raise LonglabError(f"unknown lab size {self.size!r}; known: {', '.join(SIZES)}")
        for name, value, low in (
            ("length", self.length, 8),
            ("steps", self.steps, 1),
            ("batch_size", self.batch_size, 1),
        ):
            if value < low:
                raise LonglabError(f"lab: {name} must be >= {low}, got {value}")

    @property
    def names(self) -> tuple[str, ...]:
        return self.components or PRESETS[self.preset]

    def recipe(self, vocab_size: int) -> Recipe:
        """The bundled training recipe at the lab's sizes: corpus text mixed with passkey exercises
        (when they fit in the training length), the same warm-up/cosine schedule and AdamW."""
        exercises = self.length >= SHORTEST_PASSKEY
        return Recipe(
            vocab_size=vocab_size,
            context=self.length,
            batch_size=self.batch_size,
            steps=self.steps,
            learning_rate=self.learning_rate,
            warmup_steps=self.warmup_steps,
            seed=self.seed,
            text_fraction=0.5 if exercises else 1.0,
            exercise_mix=(("passkey", 1.0),),
            shortest_exercise=min(SHORTEST_PASSKEY, self.length),
        )


SHORTEST_PASSKEY = 96  # tokens: the passkey template with a little filler (81 tokens bare)


TRAIN_TOKENS = 1 << 20  # corpus tokens the lab trains from: several times what the default run reads


def _corpus(out: Path) -> Path:
    corpus = out / "data" / "corpus"
    if not (corpus / "manifest.json").exists():
        build_corpus(corpus)
    return corpus


def tokenizer(out: Path, config: LabConfig) -> PreTrainedTokenizerFast:
    """The bundled model's tokenizer, or (``vocab_size`` > 0) a smaller byte-level BPE trained once on
    the corpus's train split with the bundled recipe's trainer: a small vocabulary leaves a tiny model
    most of its compute for attention instead of the output layer."""
    if not config.vocab_size:
        return PreTrainedTokenizerFast.from_pretrained(model_path("tiny"))
    folder = out / "data" / f"tokenizer-{config.vocab_size}"
    if not (folder / "tokenizer.json").exists():
        train_tokenizer(read_split(_corpus(out), "train"), config.vocab_size).save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def _tokens(out: Path, tok: PreTrainedTokenizerFast, split: str) -> np.ndarray:
    """The corpus split's tokens (train: its first documents up to ``TRAIN_TOKENS``), cached in ``out/data``."""
    cached = out / "data" / f"{split}-{len(tok)}.npy"
    if not cached.exists():
        texts = read_split(_corpus(out), split)
        if split == "train":
            chosen, count = [], 0
            for text in texts:  # documents in the corpus's fixed order: the same tokens on every machine
                chosen.append(text)
                count += len(text) // 3  # about 3 characters a token: enough to stop near the budget
                if count >= TRAIN_TOKENS:
                    break
            texts = chosen
        np.save(cached, token_stream(tok, texts))
    return np.load(cached)


class Results:
    """results.jsonl: append-only; ``done`` answers whether a (component, kind, length) row exists."""

    def __init__(self, path: Path):
        self.path = path
        self.rows = (
            [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        )

    def done(self, name: str, kind: str, length: int | None = None) -> bool:
        return any(r["component"] == name and r["kind"] == kind and r.get("length") == length for r in self.rows)

    def append(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows.append(row)


def _check_config(out: Path, config: LabConfig) -> None:
    """A folder holds one configuration: resuming with other settings would mix incomparable rows."""
    path, wanted = out / "config.json", dataclasses.asdict(config)
    wanted.pop("components")  # adding components to a run is fine; each is trained alike
    if path.exists():
        if json.loads(path.read_text()) != json.loads(json.dumps(wanted)):
            raise LonglabError(f"{out} holds a lab run with another configuration; use a new --out folder")
    else:
        path.write_text(json.dumps(wanted, indent=1))


def run(out: Path, config: LabConfig = LabConfig(), device: str | torch.device = "cpu") -> Path:
    """Train and measure every component of ``config`` into ``out``; returns the report's path."""
    from longlab.lab.report import write_report

    device = torch.device(device)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data").mkdir(exist_ok=True)
    _check_config(out, config)
    tok = tokenizer(out, config)
    results = Results(out / "results.jsonl")
    train_tokens, test_tokens = None, None
    for name in config.names:
        spec = model_spec(name)
        key = spec_name(*spec)
        if not results.done(key, "train"):
            train_tokens = _tokens(out, tok, "train") if train_tokens is None else train_tokens
            row = train(out / "models" / slug(key), spec, config, tok, train_tokens, device)
            results.append({"component": key, "kind": "train", **row})
        model = _load(out / "models" / slug(key), spec, config, len(tok), device)
        test_tokens = _tokens(out, tok, "test") if test_tokens is None else test_tokens
        for multiple in config.multiples:
            length = multiple * config.length
            if not results.done(key, "ppl", length):
                row = evaluate.perplexity(model, test_tokens, length, config.ppl_windows)
                results.append({"component": key, "kind": "ppl", "length": length, **row})
            if config.passkey_samples and not results.done(key, "passkey", length):
                row = evaluate.passkey(model, tok, length, config.passkey_samples, config.seed)
                results.append({"component": key, "kind": "passkey", "length": length, **row})
    return write_report(out, config, results.rows)


def _build(spec, config: LabConfig, vocab: int) -> LabModel:
    torch.manual_seed(config.seed)  # the same initial weights for every component (where shapes agree)
    with torch.device("cpu"):  # and on every device
        return LabModel(vocab, SIZES[config.size], spec[0], config.length, attention=spec[1])


def _load(folder: Path, spec, config: LabConfig, vocab: int, device: torch.device) -> LabModel:
    model = _build(spec, config, vocab)
    model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
    return model.to(device).eval()


def train(folder: Path, spec, config: LabConfig, tok, text: np.ndarray, device: torch.device) -> dict:
    """Train one model (``spec``: its position and attention components), resuming its checkpoint;
    returns its training row (tokens/s, peak memory, loss)."""
    folder.mkdir(parents=True, exist_ok=True)
    recipe = config.recipe(len(tok))
    model = _build(spec, config, len(tok)).to(device)
    optimizer = make_optimizer(model.parameters(), recipe)  # the bundled recipe's AdamW groups, reused
    start, log_path = load_state(folder, model, optimizer, recipe, device), folder / "log.jsonl"
    batches = Batches(recipe, tok, text)
    position = model.model.position
    memory.reset_peak(device)
    model.train()
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=spec_name(*spec), unit="step")
    with log_path.open("a") as log:
        for step in bar:
            began = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(recipe, step)
            ids = batches(step).to(device)
            generator = torch.Generator(device="cpu").manual_seed(config.seed * 1_000_003 + step)
            positions = position.positions(ids.shape[1], device, generator)
            loss = model.loss(ids, positions)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            position.project()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - began
            bar.set_postfix(loss=f"{loss.item():.3f}")
            entry = {"step": step + 1, "loss": loss.item(), "seconds": seconds, "peak_bytes": memory.peak_bytes(device)}
            log.write(json.dumps(entry) + "\n")
            log.flush()
            if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
                save_state(folder, model, optimizer, step + 1, recipe)
    torch.save(model.state_dict(), folder / "model.pt")
    steps = [json.loads(line) for line in log_path.read_text().splitlines()]
    steps = {s["step"]: s for s in steps}  # a resumed run may have logged a step twice: keep the last
    seconds = sum(s["seconds"] for s in steps.values())
    peaks = [s["peak_bytes"] for s in steps.values() if s["peak_bytes"] is not None]
    return {
        "steps": config.steps,
        "tokens": config.steps * config.batch_size * config.length,
        "tokens_per_s": config.steps * config.batch_size * config.length / seconds,
        "peak_memory_mb": max(peaks) / 2**20 if peaks else None,
        "final_loss": float(np.mean([steps[s]["loss"] for s in sorted(steps)[-10:]])),
        "parameters": sum(p.numel() for p in model.parameters()),
        "kv_bytes_per_token": kv_bytes_per_token(model),
        "device": device.type,
    }
