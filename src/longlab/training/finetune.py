"""``longlab finetune``: train a checkpoint at a longer length under a position method.

The loop is ``longlab train``'s (longlab.bundled.train): the same batches (corpus text mixed with the
long-context exercises, a pure function of (seed, step)), learning-rate schedule, optimizer, resumable
state and progress bar; here the model is ``longlab.apply``'d, so it trains through longlab's kernel
and its exact backward, with position ids chosen by the recipe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from longlab.bridge import apply, reset
from longlab.bridge.patch import local_attention, patch_of, rope_config
from longlab.bundled import train as base
from longlab.data.corpus import build_corpus
from longlab.errors import LonglabError
from longlab.loading import load, resolve_device
from longlab.parallel import shard
from longlab.positions.base import PositionMethod
from longlab.spec import compose, parse
from longlab.training.checkpoint import write_method
from longlab.training.pose import pose_positions
from longlab.training.recipe import FinetuneRecipe
from longlab.training.ring import LAYOUT, check_ring, check_row_length, process_group, ring_loss
from longlab.training.s2attn import shifted_sparse_attention


def position_method(spec: str, model: torch.nn.Module) -> PositionMethod:
    """The one position method of ``spec``, resolved against ``model``; anything else is refused."""
    methods = parse(spec)
    others = [m for m in methods if m.kind != "position"]
    if others or len(methods) != 1:
        kinds = ", ".join(f"{m.name} ({m.kind})" for m in others) or spec
        raise LonglabError(f"finetune trains one position method (e.g. linear:factor=4, yarn:factor=4); got {kinds}")
    return compose(spec).resolve(rope_config(model)).position


class Rows:
    """(input ids, position ids) of step s: the bundled recipe's rows at the target length, and for
    PoSE the tokens at each row's PoSE positions (a pure function of (seed, step), like the rows)."""

    def __init__(self, recipe: FinetuneRecipe, train_length: int, tokenizer, text: np.ndarray):
        data = dataclasses.replace(base.Recipe(), context=recipe.length, batch_size=recipe.batch_size, seed=recipe.seed)
        self.batches = base.Batches(data, tokenizer, text)
        self.recipe, self.train_length = recipe, train_length

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.batches(step)
        if self.recipe.recipe != "pose":
            return ids, torch.arange(ids.shape[1]).expand_as(ids)
        rng = random.Random(self.recipe.seed * 1_000_003 + step + 7_919)  # its own stream: rows stay the same
        positions = torch.tensor(
            [pose_positions(rng, self.train_length, self.recipe.length, self.recipe.pose_chunks) for _ in ids]
        )
        return ids.gather(1, positions), positions


def _text_tokens(out: Path, tokenizer) -> np.ndarray:
    """The corpus's training split in ``tokenizer``'s tokens, built and cached once per run folder."""
    cache = out / "train_tokens.npy"
    if not cache.exists():
        corpus = out / "corpus"
        if not (corpus / "manifest.json").exists():
            build_corpus(corpus)
        np.save(out / "train_tokens.tmp.npy", base.tokenize_split(tokenizer, corpus, "train"))
        (out / "train_tokens.tmp.npy").replace(cache)
    return np.load(cache)


def _lora(model: torch.nn.Module, recipe: FinetuneRecipe) -> torch.nn.Module:
    """LoRA on q/k/v/o through peft, with embeddings and norms trainable (LongLoRA section 3.3)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise LonglabError(
            "--recipe longlora trains LoRA adapters through peft: pip install 'longlab[train]'"
        ) from None

    config = LoraConfig(r=recipe.lora_rank, lora_alpha=recipe.lora_alpha, lora_dropout=0.0, bias="none",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])  # fmt: skip
    wrapped = get_peft_model(model, config)
    for name, param in wrapped.named_parameters():
        if "embed_tokens" in name or "norm" in name:
            param.requires_grad_(True)
    return wrapped


def prepare_model(model: torch.nn.Module, method: PositionMethod, recipe: FinetuneRecipe) -> torch.nn.Module:
    """Apply the method; for LongLoRA wrap in LoRA and attend with S²-Attn. Returns the model to train."""
    apply(model, method)
    if recipe.recipe != "longlora":
        return model
    patch_of(model).attend = functools.partial(shifted_sparse_attention, local_attention, recipe.group_size())
    return _lora(model, recipe)


def finetune(
    out: Path,
    recipe: FinetuneRecipe | None = None,
    model: str | Path = "tiny",
    threads: int | None = None,
    device: str | torch.device = "cpu",
    ring: int | None = None,
) -> Path:
    """Fine-tune (or resume) into ``out``; returns the folder of the final checkpoint (``out``/final).

    ``ring`` = N splits every training row over the N processes of a torch.distributed group (torchrun's,
    or one already initialized) with ring attention (longlab.training.ring); the run, its log, state and
    checkpoint are the single-process run's up to float rounding, and it resumes either way.
    """
    recipe = recipe or FinetuneRecipe()
    check_ring(ring, recipe)
    device = resolve_device(device)
    if threads:
        torch.set_num_threads(threads)
    if ring is None:
        return _finetune(out, recipe, model, device, None, 0)
    with process_group(ring, device) as (rank, rank_device):
        final = _finetune(out, recipe, model, rank_device, ring, rank)
        dist.barrier()  # the checkpoint is complete before any rank returns its path
    return final


def _finetune(out: Path, recipe: FinetuneRecipe, model: str | Path, device: torch.device, ring: int | None,
              rank: int) -> Path:  # fmt: skip
    primary = rank == 0  # the one process that writes the log, the state and the checkpoint
    out.mkdir(parents=True, exist_ok=True)
    network, tokenizer = load(model, dtype=torch.float32, device="cpu")  # the same start on every device
    method = position_method(recipe.method, network)
    rope = rope_config(network)
    train_length = recipe.length if recipe.recipe != "pose" else (recipe.train_length or rope.original_length)
    if recipe.recipe == "pose" and train_length >= recipe.length:
        raise LonglabError(
            f"finetune: PoSE trains short to reach long: the training length ({train_length}) must be below the "
            f"target length ({recipe.length})"
        )
    if ring is not None:
        check_row_length(ring, train_length)
    with _first(ring is not None, primary):  # rank 0 builds the token cache, the others then read it
        text = _text_tokens(out, tokenizer)
    rows = Rows(recipe, train_length, tokenizer, text)
    torch.manual_seed(recipe.seed)
    trained = prepare_model(network, method, recipe).to(device)
    trained.train()
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = base.make_optimizer(params, recipe)
    state_dir = out / "checkpoint"
    start = base.load_state(state_dir, trained, optimizer, recipe, device)
    bar = tqdm(range(start, recipe.steps), initial=start, total=recipe.steps, desc=f"finetune {recipe.recipe}",
               unit="step", disable=not primary)  # fmt: skip
    sequence_parallel = shard(network, layout=LAYOUT) if ring is not None else contextlib.nullcontext()
    log = (out / "log.jsonl").open("a") if primary else contextlib.nullcontext()
    with log, sequence_parallel as sp:
        for step in bar:
            began = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = base.learning_rate(recipe, step)
            ids, positions = (t.to(device) for t in rows(step))
            if sp is None:
                loss = trained(input_ids=ids, position_ids=positions, labels=ids, use_cache=False).loss
                loss.backward()
            else:
                loss = ring_loss(trained, sp, ids, positions)
                loss.backward()
                sp.all_reduce_gradients()  # each rank holds its tokens' share; the sum is the whole gradient
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            speed = ids.numel() / (time.perf_counter() - began)
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{speed:.0f}")
            if not primary:
                continue
            entry = {
                "step": step + 1,
                "loss": loss.item(),
                "lr": base.learning_rate(recipe, step),
                "tokens_per_s": speed,
            }
            log.write(json.dumps(entry) + "\n")
            log.flush()
            if (step + 1) % recipe.checkpoint_every == 0 or step + 1 == recipe.steps:
                base.save_state(state_dir, trained, optimizer, step + 1, recipe)
    final = out / "final"
    if primary:
        save_finetuned(trained, tokenizer, method, final)
    return final


@contextlib.contextmanager
def _first(distributed: bool, primary: bool) -> Iterator[None]:
    """Run the block on the primary rank first, then on the others (they read what it wrote)."""
    if distributed and not primary:
        dist.barrier()
    yield
    if distributed and primary:
        dist.barrier()


def save_finetuned(trained: torch.nn.Module, tokenizer, method: PositionMethod, folder: Path) -> None:
    """A plain transformers checkpoint (LoRA merged, longlab's patch removed) with the method in config."""
    model = trained.merge_and_unload() if hasattr(trained, "merge_and_unload") else trained
    rope = patch_of(model).rope
    reset(model)
    model.eval()
    if folder.exists():
        shutil.rmtree(folder)
    model.to("cpu", torch.float32).save_pretrained(folder)  # float32: the round trip reproduces the logits
    tokenizer.save_pretrained(folder)
    write_method(folder, method, rope)
