"""Efficient attention components against their papers' equations written plainly (O(L^2)), output and
gradients; linear attention's recurrent decoding form against its parallel form; identity settings."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from longlab.errors import SpecError
from longlab.lab.attention.linear import LinearState
from longlab.lab.components import component, model_spec, spec_name
from longlab.lab.model import SIZES, LabModel
from longlab.lab.positions.base import ModelShape

SHAPE = ModelShape(d_model=16, heads=4, head_dim=4, train_length=8, layers=2)


def _inputs(t=23, d=8, dtype=torch.float64):
    return tuple(torch.randn(2, 3, t, d, dtype=dtype, requires_grad=True) for _ in range(3))


def naive_sliding(q, k, v, window):
    """softmax over keys i - window < j <= i, the full matrix masked."""
    t = q.shape[2]
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    allowed = (j <= i) & (i - j < window)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~allowed, -math.inf)
    return torch.softmax(scores, -1) @ v


def naive_linear(q, k, v, eps):
    """Katharopoulos et al. 2020, eq. 6: out_i = sum_{j<=i} phi(q_i).phi(k_j) v_j / sum_{j<=i} phi(q_i).phi(k_j)."""
    phi = lambda x: F.elu(x) + 1  # noqa: E731
    t = q.shape[2]
    weights = (phi(q) @ phi(k).transpose(-1, -2)) * torch.ones(t, t, dtype=q.dtype).tril()
    return (weights @ v) / (weights.sum(-1, keepdim=True) + eps)


def _check(ours, reference, inputs):
    torch.testing.assert_close(ours, reference)
    grad = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(reference, inputs, grad), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("window", [1, 5, 64])
def test_sliding_equals_the_masked_softmax(window):
    q, k, v = _inputs()
    module = component(f"sliding:window={window}").build(SHAPE, 0)
    _check(module(q, k, v, torch.arange(23)), naive_sliding(q, k, v, window), (q, k, v))


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_linear_equals_its_equation(chunk):
    q, k, v = _inputs()
    module = component(f"linear:chunk={chunk}").build(SHAPE, 0)
    _check(module(q, k, v, torch.arange(23)), naive_linear(q, k, v, 1e-6), (q, k, v))


def test_linear_recurrent_decoding_equals_the_parallel_form():
    q, k, v = (x.detach() for x in _inputs())
    parallel = component("linear:chunk=5").build(SHAPE, 0)(q, k, v, torch.arange(23))
    state = LinearState()
    steps = torch.stack([state.step(q[:, :, i], k[:, :, i], v[:, :, i]) for i in range(23)], dim=2)
    torch.testing.assert_close(steps, parallel)
    assert state.state.shape == (2, 3, 8, 8)  # constant memory: one d x d state per head, whatever the length


def test_a_window_covering_the_sequence_is_full_attention():
    q, k, v = _inputs(dtype=torch.float32)
    ours = component("sliding:window=23").build(SHAPE, 0)(q, k, v, torch.arange(23))
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)


def _loss(spec, ids):
    torch.manual_seed(0)
    position, attention = model_spec(spec)
    model = LabModel(50, SIZES["tiny"], position, train_length=16, attention=attention)
    return model.loss(ids)


def test_the_model_with_a_full_window_is_the_rope_model():
    ids = torch.randint(0, 50, (2, 30))
    torch.testing.assert_close(_loss("rope+sliding:window=30", ids), _loss("rope", ids))
    assert not torch.allclose(_loss("rope+sliding:window=4", ids), _loss("rope", ids))


def test_linear_model_trains():
    position, attention = model_spec("rope+linear")
    model = LabModel(50, SIZES["tiny"], position, train_length=16, attention=attention)
    loss = model.loss(torch.randint(0, 50, (2, 30)))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


def test_model_specs():
    assert spec_name(*model_spec("alibi")) == "alibi:scale=1.0"
    assert spec_name(*model_spec("rope+sliding:window=8")) == "rope:base=10000.0+sliding:window=8"
    with pytest.raises(SpecError, match="cannot add alibi's position bias"):
        model_spec("alibi+linear")
    with pytest.raises(SpecError, match="two lab-position components"):
        model_spec("rope+alibi")
    with pytest.raises(SpecError, match="'window' must be an integer >= 1"):
        model_spec("rope+sliding:window=0")
