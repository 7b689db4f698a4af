"""``abf`` (a RoPE base change, Xiong et al. 2023): the same logits as transformers' RoPE at that base."""

from __future__ import annotations

import pytest
import torch
from tests.support import reference
from tests.support.models import build

import longlab
from longlab.errors import SpecError
from longlab.positions.abf import ABF
from longlab.positions.rope import RopeConfig


def test_table_is_plain_rope_at_the_new_base():
    rope = RopeConfig(head_dim=16, base=10000.0, original_length=64, native_inv_freq=reference.inv_freq(16).float())
    table = ABF(base=500000.0).table(rope, 128)
    torch.testing.assert_close(table.inv_freq.double(), reference.inv_freq(16, 500000.0))
    assert table.attention_factor == 1.0


def test_same_logits_as_transformers_with_that_base():
    ours = build("llama")
    theirs = build("llama", rope={"rope_theta": 500000.0})  # same seed: same weights, another base
    ids = torch.randint(3, 128, (2, 150), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(ids).logits
        got = longlab.apply(ours, "abf:base=500000")(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_at_the_models_own_base_it_is_the_model():
    model = build("llama")
    ids = torch.randint(3, 128, (1, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(ids).logits
        same = longlab.apply(model, "abf:base=10000")(ids).logits
    torch.testing.assert_close(same, plain, atol=1e-5, rtol=1e-5)


def test_base_must_exceed_one():
    with pytest.raises(SpecError, match=r"abf: parameter 'base' must be a number > 1 and <= 1e\+30, got 1.0"):
        longlab.parse("abf:base=1")
