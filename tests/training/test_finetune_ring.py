"""``longlab finetune --ring N`` against the single-process run of the same recipe: 2 gloo ranks spawned on
the CPU (one thread each, as tests/parallel does), the bundled model at tiny lengths. The reference is
today's ``finetune`` without --ring, which shares none of the ring's code (no shard, no ring kernel, the
model's own shifted loss)."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

import longlab
from longlab.cli import main
from longlab.data.corpus import documents
from longlab.errors import LonglabError
from longlab.parallel import shard
from longlab.training import finetune as ft
from longlab.training.recipe import FinetuneRecipe
from longlab.training.ring import check_row_length

RECIPES = {
    "full": FinetuneRecipe(method="linear:factor=2", length=64, steps=2, batch_size=2, warmup_steps=1),
    # PoSE rows of 32 tokens whose positions jump across 1024: the shards carry those positions, and the
    # dynamic method's table must be the one for the largest position (past L_train = 512), not for 32
    "pose": FinetuneRecipe(method="dynamic_ntk:factor=2", recipe="pose", length=1024, train_length=32, steps=2,
                           batch_size=2, warmup_steps=1),
}  # fmt: skip
RESUMED = dataclasses.replace(RECIPES["full"], checkpoint_every=1)
ATOL = 1e-5  # float32; the ring sums attention and gradients in another order than one process
# AdamW's first steps move a weight by about lr * g / |g|: where g is at rounding level the sign can differ
# between two exact computations, and that weight differs by up to 2 lr per step. Such weights are few.
FLIPPED_FRACTION = 1e-4
GRAD_ATOL = 1e-6


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    """A few thousand tokens of real corpus text (the run folder's token cache, so no corpus is built)."""
    _, tokenizer = longlab.load("tiny")
    text = "\n".join(t[:4000] for _, t in itertools.islice(documents(), 4))
    return np.asarray(tokenizer(text)["input_ids"], dtype=np.int32)


def _folder(path: Path, tokens: np.ndarray) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "train_tokens.npy", tokens)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _first_gradients(path: Path) -> Iterator[None]:
    """Save the gradients the optimizer's first step receives (all-reduced and clipped) to ``path``."""
    seen = []

    def save(optimizer, args, kwargs):
        if not seen:
            seen.append(True)
            grads = [p.grad.detach().clone() for group in optimizer.param_groups for p in group["params"]]
            torch.save(grads, path)

    handle = register_optimizer_step_pre_hook(save)
    try:
        yield
    finally:
        handle.remove()


def _worker(rank: int, world: int, port: int, jobs: list[tuple[str, FinetuneRecipe]]) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for folder, recipe in jobs:
            with _first_gradients(Path(folder) / f"grads{rank}.pt"):
                ft.finetune(Path(folder), recipe, threads=1, device="cpu", ring=world)
    finally:
        dist.destroy_process_group()


def _losses(folder: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / "log.jsonl").read_text().splitlines()]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "final" / "model.safetensors")


def _assert_same_run(ring: Path, single: Path, recipe: FinetuneRecipe) -> None:
    ring_losses, single_losses = _losses(ring), _losses(single)
    assert len(ring_losses) == len(single_losses) == recipe.steps
    np.testing.assert_allclose(ring_losses, single_losses, rtol=0, atol=ATOL)
    expected, got = _weights(single), _weights(ring)
    assert got.keys() == expected.keys()
    flipped = total = 0
    for key, tensor in got.items():
        difference = (tensor - expected[key]).abs()
        assert difference.max() <= 2 * recipe.learning_rate * recipe.steps, key
        flipped += int((difference > ATOL).sum())
        total += difference.numel()
    assert flipped <= FLIPPED_FRACTION * total, f"{flipped} of {total} weights differ by more than {ATOL}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokens) -> dict[str, Path]:
    """Single-process runs, and ring runs of 2 ranks (one spawn for all of them: start-up dominates)."""
    root = tmp_path_factory.mktemp("ring")
    folders = {}
    for name, recipe in RECIPES.items():
        folders[f"single-{name}"] = _folder(root / f"single-{name}", tokens)
        with _first_gradients(folders[f"single-{name}"] / "grads0.pt"):
            ft.finetune(folders[f"single-{name}"], recipe, threads=1)
    # an interrupted single-process run, resumed below by the ring from its step-1 state
    folders["resumed"] = _folder(root / "resumed", tokens)
    original = ft.Rows.__call__

    def stop_at_step_1(self, step):
        if step == 1:
            raise KeyboardInterrupt
        return original(self, step)

    ft.Rows.__call__ = stop_at_step_1
    try:
        with pytest.raises(KeyboardInterrupt):
            ft.finetune(folders["resumed"], RESUMED, threads=1)
    finally:
        ft.Rows.__call__ = original
    jobs = [(str(folders["resumed"]), RESUMED)]
    for name, recipe in RECIPES.items():
        folders[f"ring-{name}"] = _folder(root / f"ring-{name}", tokens)
        jobs.append((str(folders[f"ring-{name}"]), recipe))
    mp.spawn(_worker, args=(2, _free_port(), jobs), nprocs=2, join=True)
    return folders


@pytest.mark.parametrize("name", list(RECIPES))
def test_two_ranks_give_the_single_process_gradient(runs, name):
    """The first step's gradient, summed over the ranks, on both ranks, is the single-process gradient."""
    expected = torch.load(runs[f"single-{name}"] / "grads0.pt")
    for rank in range(2):
        got = torch.load(runs[f"ring-{name}"] / f"grads{rank}.pt")
        assert len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, atol=GRAD_ATOL, rtol=0)


@pytest.mark.parametrize("name", list(RECIPES))
def test_two_ranks_give_the_single_process_losses_and_weights(runs, name):
    _assert_same_run(runs[f"ring-{name}"], runs[f"single-{name}"], RECIPES[name])


def test_ring_resumes_a_run_to_the_same_weights(runs):
    """A run stopped after step 1 (single process) and finished by 2 ranks ends as the uninterrupted one."""
    state = torch.load(runs["resumed"] / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == 2  # the ring finished it and rank 0 wrote the state
    _assert_same_run(runs["resumed"], runs["single-full"], RESUMED)


@pytest.mark.parametrize("name", list(RECIPES))
def test_one_rank_ring_is_the_single_process_run(runs, tokens, tmp_path, name):
    """--ring 1 without torchrun: a process group of one, the same ring code path, the same run."""
    ft.finetune(_folder(tmp_path, tokens), RECIPES[name], threads=1, ring=1)
    assert not dist.is_initialized()  # the group it made is gone
    _assert_same_run(tmp_path, runs[f"single-{name}"], RECIPES[name])


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ring", [0, -2, 1.5])
def test_ring_below_one_is_refused(tmp_path, ring):
    message = rf"finetune: parameter 'ring' must be an integer( >= 1 and <= \d+)?, got {ring}"
    with pytest.raises(LonglabError, match=message):
        ft.finetune(tmp_path, RECIPES["full"], ring=ring)


def test_longlora_does_not_compose_with_the_ring(tmp_path):
    recipe = FinetuneRecipe(recipe="longlora", length=64, steps=1)
    with pytest.raises(LonglabError, match="--ring does not compose with --recipe longlora: S2-Attn"):
        ft.finetune(tmp_path, recipe, ring=2)


def test_rows_must_split_into_two_chunks_per_rank(tmp_path, tokens):
    with pytest.raises(LonglabError, match=r"--ring 3 cuts every training row into 6 equal chunks .* rows are 64 "):
        check_row_length(3, 64)
    check_row_length(2, 64)  # 4 chunks of 16
    odd = dataclasses.replace(RECIPES["full"], length=65)
    with pytest.raises(LonglabError, match=r"--ring 1 cuts every training row into 2 equal chunks.*rows are 65 "):
        ft.finetune(_folder(tmp_path, tokens), odd, ring=1)
    pose = dataclasses.replace(RECIPES["pose"], train_length=31)  # PoSE: the short row is what is split
    with pytest.raises(LonglabError, match=r"--ring 1 .* rows are 31 tokens; use a length that is a multiple of 2"):
        ft.finetune(_folder(tmp_path, tokens), pose, ring=1)
    assert not dist.is_initialized()


def test_ring_needs_as_many_processes(tmp_path):
    with pytest.raises(LonglabError, match=r"--ring 2 runs as 2 processes, but this is one of 1: start it with "
                       r"torchrun --nproc-per-node 2 -m longlab.cli finetune --ring 2"):  # fmt: skip
        ft.finetune(tmp_path, RECIPES["full"], ring=2)


def test_torchrun_without_ring_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LonglabError, match=r"WORLD_SIZE=2\) but without --ring.*pass --ring 2"):
        ft.finetune(tmp_path, RECIPES["full"])


def test_cli_reports_a_bad_ring(tmp_path, capsys):
    argv = ["finetune", "--method", "linear:factor=2", "--length", "64", "--out", str(tmp_path), "--ring", "0"]
    assert main(argv) == 2
    assert "parameter 'ring' must be an integer >= 1" in capsys.readouterr().err


def test_split_with_position_ids_refuses_padding():
    """shard().split(ids, position_ids) keeps the rows' own positions; it cannot pad them (PoSE has gaps)."""
    model, _ = longlab.load("tiny")
    longlab.apply(model, "none")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        with shard(model, layout="zigzag") as sp:
            positions = torch.tensor([[0, 5, 6, 9]])
            ids = torch.arange(10, 14)[None]
            local, local_positions = sp.split(ids, positions)  # one rank: its shard is the whole row
            assert torch.equal(local, ids) and torch.equal(local_positions, positions)
            assert sp.global_length(local_positions) == 10  # the table for the largest position, not for 4
            with pytest.raises(LonglabError, match="3 tokens do not divide into 2 equal zigzag chunks"):
                sp.split(torch.arange(3)[None], positions[:, :3])
    finally:
        dist.destroy_process_group()
