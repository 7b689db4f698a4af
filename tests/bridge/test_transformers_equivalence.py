"""longlab's frequency tables give the same logits as transformers' own RoPE implementations."""

from __future__ import annotations

import pytest
import torch

import longlab
from support.models import L_TRAIN, build

# longlab spec -> the equivalent transformers rope_parameters
EQUIVALENT = {
    "linear:factor=4": {"rope_type": "linear", "factor": 4.0},
    "dynamic_ntk:factor=2": {"rope_type": "dynamic", "factor": 2.0},
    "yarn:factor=4": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L_TRAIN},
    "yarn:factor=8,beta_fast=16,beta_slow=2": {
        "rope_type": "yarn", "factor": 8.0, "beta_fast": 16.0, "beta_slow": 2.0,
        "original_max_position_embeddings": L_TRAIN,
    },
    "llama3:factor=8": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": L_TRAIN,
    },
}  # fmt: skip
LONGROPE_SHORT = [1.0 + 0.05 * i for i in range(8)]
LONGROPE_LONG = [1.0 + 0.9 * i for i in range(8)]


def _pair(family, rope):
    ours, theirs = build(family), build(family, rope=rope)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _logits(model, length):
    ids = torch.randint(3, 128, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("spec", list(EQUIVALENT))
@pytest.mark.parametrize("length", [40, 3 * L_TRAIN + 5])
def test_same_logits_as_transformers(family, spec, length):
    ours, theirs = _pair(family, EQUIVALENT[spec])
    longlab.apply(ours, spec)
    torch.testing.assert_close(_logits(ours, length), _logits(theirs, length), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("length", [40, 3 * L_TRAIN + 5])
def test_longrope_same_logits_as_transformers(family, length):
    rope = {
        "rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": L_TRAIN,
        "short_factor": LONGROPE_SHORT, "long_factor": LONGROPE_LONG,
    }  # fmt: skip
    ours, theirs = _pair(family, rope)
    longlab.apply(ours, "longrope", factor=4.0, short_factor=LONGROPE_SHORT, long_factor=LONGROPE_LONG)
    torch.testing.assert_close(_logits(ours, length), _logits(theirs, length), atol=1e-4, rtol=0)


def test_a_wrong_factor_is_detected():
    """Control: the comparison above is sensitive to the method's parameters."""
    ours, theirs = _pair("llama", EQUIVALENT["yarn:factor=4"])
    longlab.apply(ours, "yarn:factor=2")
    assert (_logits(ours, 150) - _logits(theirs, 150)).abs().max() > 1e-2
