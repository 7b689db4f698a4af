"""``longlab finetune`` on the bundled model at tiny lengths: each recipe trains, resumes exactly, is
deterministic, and saves a checkpoint that ``from_pretrained`` + ``longlab.apply`` reproduces."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import longlab
from longlab.bridge import patch_of
from longlab.data.corpus import documents
from longlab.errors import LonglabError
from longlab.training import finetune as ft
from longlab.training.recipe import FinetuneRecipe

RECIPES = {
    "full": FinetuneRecipe(method="linear:factor=2", length=64, steps=4, batch_size=1, checkpoint_every=2,
                           warmup_steps=1),
    "pose": FinetuneRecipe(method="linear:factor=2", recipe="pose", length=128, train_length=32, steps=4,
                           batch_size=2, checkpoint_every=2, warmup_steps=1),
    "longlora": FinetuneRecipe(method="linear:factor=2", recipe="longlora", length=64, steps=4, batch_size=1,
                               checkpoint_every=2, warmup_steps=1, learning_rate=2e-3),
}  # fmt: skip


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    """A few thousand tokens of real corpus text (the run folder's token cache, so no corpus is built)."""
    _, tokenizer = longlab.load("tiny")
    text = "\n".join(t[:4000] for _, t in itertools.islice(documents(), 4))
    return np.asarray(tokenizer(text)["input_ids"], dtype=np.int32)


def _run(folder: Path, tokens: np.ndarray, recipe: FinetuneRecipe) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "train_tokens.npy", tokens)
    return ft.finetune(folder, recipe, threads=1)


def _losses(folder: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / "log.jsonl").read_text().splitlines()]


def _weights(final: Path) -> dict[str, torch.Tensor]:
    return load_file(final / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tokens) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("finetune")
    return {name: _run(root / name, tokens, recipe) for name, recipe in RECIPES.items()}


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_trains_with_finite_loss(uninterrupted, name):
    losses = _losses(uninterrupted[name].parent)
    assert len(losses) == RECIPES[name].steps and all(np.isfinite(losses))


@pytest.mark.parametrize("name", list(RECIPES))
def test_interrupted_run_resumes_to_the_same_weights(uninterrupted, tokens, tmp_path, monkeypatch, name):
    original = ft.Rows.__call__

    def stop_at_step_3(self, step):
        if step == 3:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(ft.Rows, "__call__", stop_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, tokens, RECIPES[name])
    monkeypatch.setattr(ft.Rows, "__call__", original)
    resumed = _run(tmp_path, tokens, RECIPES[name])
    expected = _weights(uninterrupted[name])
    assert all(torch.equal(t, expected[key]) for key, t in _weights(resumed).items())


def test_runs_are_deterministic(uninterrupted, tokens, tmp_path):
    again = _weights(_run(tmp_path, tokens, RECIPES["full"]))
    expected = _weights(uninterrupted["full"])
    assert again.keys() == expected.keys()
    assert all(torch.equal(t, expected[key]) for key, t in again.items())


@pytest.mark.parametrize("name", list(RECIPES))
def test_loss_decreases_on_a_repeated_batch(tokens, tmp_path, monkeypatch, name):
    original = ft.Rows.__call__
    monkeypatch.setattr(ft.Rows, "__call__", lambda self, step: original(self, 0))
    recipe = RECIPES[name]
    _run(tmp_path, tokens, FinetuneRecipe(**{**recipe.__dict__, "steps": 6, "warmup_steps": 0}))
    losses = _losses(tmp_path)
    assert losses[-1] < losses[0] - 0.05


def _trained_in_memory(name: str, final: Path) -> torch.nn.Module:
    """The model as it was at the end of training (resumable state, before saving), full attention."""
    recipe = RECIPES[name]
    model, _ = longlab.loading.load("tiny")
    trained = ft.prepare_model(model, ft.position_method(recipe.method, model), recipe)
    state = torch.load(final.parent / "checkpoint" / "state.pt", weights_only=False)
    trained.load_state_dict(state["model"])
    patch_of(model).attend = None  # LongLoRA: S²-Attn is for training; inference attends fully
    return trained.eval()


@pytest.mark.parametrize("name", list(RECIPES))
def test_saved_checkpoint_reproduces_the_fine_tuned_model(uninterrupted, name):
    final = uninterrupted[name]
    ids = torch.randint(3, 8000, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = _trained_in_memory(name, final)(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
        assert plain.config.longlab_method == "linear:factor=2.0,original_length=512"
        native = plain(ids).logits  # transformers' own linear scaling, from rope_parameters
        applied = longlab.apply(plain, plain.config.longlab_method)(ids).logits
        loaded = longlab.load(final)[0](ids).logits  # longlab.load applies the carried method itself
    torch.testing.assert_close(applied, expected, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(native, expected, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(loaded, expected, atol=2e-4, rtol=1e-4)


def test_fine_tuning_changed_the_weights(uninterrupted):
    base = load_file(longlab.model_path("tiny") / "model.safetensors")
    tuned = _weights(uninterrupted["full"])
    assert any(not torch.equal(tuned[k].float(), base[k].float()) for k in base)


# -- errors ---------------------------------------------------------------------------------------


def test_unknown_recipe_is_refused():
    with pytest.raises(LonglabError, match="unknown recipe 'lora'; known recipes: full, pose, longlora"):
        FinetuneRecipe(recipe="lora")


def test_pose_target_must_exceed_the_training_length(tmp_path, tokens):
    with pytest.raises(LonglabError, match=r"train_length \(512\) must be below the target length \(512\)"):
        FinetuneRecipe(recipe="pose", length=512, train_length=512)
    with pytest.raises(LonglabError, match=r"training length \(512\) must be below the target length \(256\)"):
        _run(tmp_path, tokens, FinetuneRecipe(recipe="pose", length=256))  # default: the model's 512


@pytest.mark.parametrize("spec", ["snapkv:budget=64", "linear:factor=2+logn", "logn"])
def test_a_method_that_is_not_one_position_method_is_refused(spec):
    model, _ = longlab.loading.load("tiny")
    with pytest.raises(LonglabError, match="finetune trains one position method"):
        ft.position_method(spec, model)


def test_bad_numbers_name_the_parameter():
    with pytest.raises(LonglabError, match="'steps' must be an integer >= 1"):
        FinetuneRecipe(steps=0)
    with pytest.raises(LonglabError, match="'length'"):
        FinetuneRecipe(length=1)
