"""The passkey task: Landmark's keys, its scoring of the whole generation, the depth grid."""

from __future__ import annotations

import re

import pytest
from transformers import AutoTokenizer

import longlab
from longlab.data.synthetic import Sample
from longlab.errors import SpecError
from longlab.eval.tasks import base
from longlab.eval.tasks.base import CellContext, parse_task
from longlab.eval.tasks.passkey import Passkey

TOKENIZER = AutoTokenizer.from_pretrained(longlab.model_path("tiny"))


def test_keys_default_to_landmarks_random_integer():
    task = parse_task("passkey")
    assert task.digits is None
    keys = [int(s.answers[0]) for s in task.samples("passkey", TOKENIZER, 128, 40, seed=0)]
    assert all(1 <= k <= 50000 for k in keys) and any(k < 10000 for k in keys)


def test_digits_still_gives_keys_of_that_many_digits():
    task = parse_task("passkey:digits=7")
    assert all(re.fullmatch(r"\d{7}", s.answers[0]) for s in task.samples("passkey", TOKENIZER, 128, 10, seed=0))
    assert parse_task("passkey:digits=none").digits is None
    with pytest.raises(SpecError, match="digits"):
        parse_task("passkey:digits=0")


def test_generation_is_not_cut_at_a_newline_and_the_budget_holds_the_key():
    assert Passkey().first_line("passkey") is False
    assert Passkey().new_tokens("passkey") == 10  # Landmark's max_new_tokens
    assert Passkey(digits=30).new_tokens("passkey") == 32  # every digit fits where digits are single tokens


def test_score_reads_the_first_integer_of_the_whole_generation():
    sample = Sample("prompt", ["123"])
    task = Passkey()
    assert task.score("passkey", "\nThe pass key is 0123. Remember it.", sample) == 100
    assert task.score("passkey", " 12 then 123", sample) == 0
    assert task.score("passkey", " no number at all", sample) == 0


def test_measure_asks_for_the_whole_generation(monkeypatch):
    asked = {}

    def fake_generate(model, tokenizer, prompts, new_tokens, first_line=True):
        asked.update(new_tokens=new_tokens, first_line=first_line)
        return ["\n 4242." for _ in prompts]

    monkeypatch.setattr(base, "generate_answers", fake_generate)
    task = Passkey()
    samples = [Sample("What is the pass key? The pass key is", ["4242"], {"depth": 0.5})]
    cell = CellContext(None, TOKENIZER, "passkey", 128, 1, samples, False, 1, None)
    ((_, rows),) = list(task.measure(cell, [0]))
    assert asked == {"new_tokens": 10, "first_line": False} and rows[0]["score"] == 100


def test_depth_grid_still_cycles():
    samples = Passkey(depths=3).samples("passkey", TOKENIZER, 256, 6, seed=1)
    assert [s.meta["depth"] for s in samples] == [0.0, 0.5, 1.0, 0.0, 0.5, 1.0]
    assert all(len(TOKENIZER(s.prompt, add_special_tokens=False)["input_ids"]) <= 256 - 10 for s in samples)
