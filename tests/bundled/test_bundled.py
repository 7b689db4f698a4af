"""The shipped checkpoint: a plain Hugging Face folder with the promised architecture and abilities.

Sample counts are small and thresholds have margin; the model card reports the full measurements.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import longlab
from longlab.bundled.train import tokenize_split, windows
from longlab.data import synthetic
from longlab.eval.quick import position_losses, retrieval_accuracy
from longlab.eval.scoring import first_integer_matches, string_match_all
from longlab.generation import encode, generate_answers

PATH = longlab.model_path("tiny")


@pytest.fixture(scope="module")
def tiny():
    return longlab.load("tiny")


def test_plain_hugging_face_checkpoint_within_limits():
    model = AutoModelForCausalLM.from_pretrained(PATH, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(PATH)
    config = model.config
    assert isinstance(model, LlamaForCausalLM)
    assert config.max_position_embeddings == 512 and config.rope_parameters["rope_theta"] == 10000
    assert config.head_dim >= 32 and 4096 <= len(tokenizer) <= 16384
    assert 5e6 <= sum(p.numel() for p in model.parameters()) <= 15e6
    assert (PATH / "model.safetensors").stat().st_size <= 15 * 2**20
    digits = tokenizer.convert_ids_to_tokens(tokenizer(" 73915", add_special_tokens=False)["input_ids"])
    assert digits[-5:] == ["7", "3", "9", "1", "5"]


def test_load_accepts_a_name_or_a_folder_and_names_bad_input(tiny):
    model, _ = tiny
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert isinstance(longlab.load(PATH)[0], LlamaForCausalLM)
    with pytest.raises(longlab.LonglabError, match="neither a bundled model"):
        longlab.load("no-such-model")


@pytest.mark.parametrize("length", [256, 512])
def test_passkey_within_training_length(tiny, length):
    model, tokenizer = tiny
    score = lambda out, answers: first_integer_matches(out, answers[0])  # noqa: E731
    assert retrieval_accuracy(model, tokenizer, synthetic.passkey, score, length, 12, 101, 8) >= 0.8


def test_ruler_single_needle_within_training_length(tiny):
    model, tokenizer = tiny
    score = lambda out, answers: string_match_all(out, answers) / 100  # noqa: E731
    assert retrieval_accuracy(model, tokenizer, synthetic.niah_single, score, 512, 12, 202, 12) >= 0.75


def test_passkey_collapses_far_beyond_training_length_without_extension(tiny):
    model, tokenizer = tiny
    score = lambda out, answers: first_integer_matches(out, answers[0])  # noqa: E731
    assert retrieval_accuracy(model, tokenizer, synthetic.passkey, score, 2048, 12, 303, 8) <= 0.5


def test_the_model_uses_its_context_on_held_out_text(tiny, tmp_path):
    from longlab.data.corpus import build_corpus

    model, tokenizer = tiny
    build_corpus(tmp_path)
    curve = position_losses(model, windows(tokenize_split(tokenizer, tmp_path, "validation"), 512, 32))
    assert curve[-64:].mean() < curve[:64].mean() - 0.2


def test_an_extension_method_reads_past_the_training_length(tiny):
    """The point of the whole exercise: a method beats plain RoPE at 4x the training length."""
    model, tokenizer = tiny
    rng = random.Random(404)
    # the passkey format the checkpoint was trained on (train.TRAINED_PASSKEY)
    prompts = [synthetic.passkey(tokenizer, 2048, rng, digits=5, garbage="sentences") for _ in range(8)]

    def accuracy(spec):
        longlab.apply(model, spec)
        outs = [generate_answers(model, tokenizer, [encode(tokenizer, p.prompt)], 8)[0] for p in prompts]
        longlab.reset(model)
        return sum(first_integer_matches(o, p.answers[0]) for o, p in zip(outs, prompts, strict=True)) / len(prompts)

    assert max(accuracy("selfextend:group=8,window=128"), accuracy("rerope:window=256")) > accuracy("none")
