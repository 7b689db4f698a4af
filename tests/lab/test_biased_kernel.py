"""The blockwise biased kernel equals plain attention with the whole bias written out (output and
every gradient, the bias's parameters included), and its hand-written backward passes gradcheck."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from longlab.attention.biased import biased_attention
from longlab.lab.components import component
from longlab.lab.positions.base import ModelShape

SHAPE = ModelShape(d_model=16, heads=2, head_dim=4, train_length=8)
BIASED = ["alibi", "t5:buckets=8,max_distance=8", "kerple_log", "kerple_power", "sandwich", "fire:hidden=4"]


def naive(q, k, v, bias):
    """softmax(q k^T / sqrt(d) + bias, causal) v with the full (T x T) bias: the O(L^2) reference."""
    t = q.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    return torch.softmax(scores.masked_fill(future, -math.inf), dim=-1) @ v


def _module(spec):
    module = component(spec).build(SHAPE).double()
    with torch.no_grad():  # move learnable parameters off their initial values, so every gradient matters
        for p in module.bias_params():
            p.add_(0.1 * torch.randn_like(p)).abs_()
    return module


@pytest.mark.parametrize("spec", BIASED)
@pytest.mark.parametrize("block", [3, 16])
def test_blockwise_equals_the_full_bias(spec, block):
    module = _module(spec)
    t = 11
    positions = torch.arange(t) * 3 + 2  # any increasing positions: the bias sees them, causality is by index
    q, k, v = (torch.randn(2, 2, t, 4, dtype=torch.double, requires_grad=True) for _ in range(3))
    params = module.bias_params()
    ours = biased_attention(q, k, v, positions, module.bias, params, block=block)
    full_bias = module.bias(params, positions, positions)  # (H, T, T): fine at this size, never in the kernel
    reference = naive(q, k, v, full_bias)
    torch.testing.assert_close(ours, reference)
    grad = torch.randn_like(ours)
    inputs = (q, k, v, *params)
    ours_grads = torch.autograd.grad(ours, inputs, grad)
    ref_grads = torch.autograd.grad(reference, inputs, grad)
    for a, b in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("spec", BIASED)
def test_gradcheck(spec):
    module = _module(spec)
    positions = torch.arange(5) * 2
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.double, requires_grad=True) for _ in range(3))

    def attend(q, k, v, *params):
        return biased_attention(q, k, v, positions, module.bias, params, block=2)

    # fast mode: a random projection of the Jacobian, so many parameters cost two passes, not hundreds
    assert torch.autograd.gradcheck(attend, (q, k, v, *module.bias_params()), fast_mode=True)


def test_zero_bias_is_causal_attention():
    q, k, v = (torch.randn(2, 4, 37, 8) for _ in range(3))
    positions = torch.arange(37)
    ours = biased_attention(q, k, v, positions, lambda params, qp, kp: torch.zeros(1, len(qp), len(kp)), block=8)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)


def test_no_full_bias_is_built():
    """The bias function is only ever asked for one block: never the (T x T) matrix."""
    asked = []

    def bias(params, qp, kp):
        asked.append((len(qp), len(kp)))
        return torch.zeros(1, len(qp), len(kp))

    q = torch.randn(1, 1, 40, 4, requires_grad=True)
    biased_attention(q, q, q, torch.arange(40), bias, block=8).sum().backward()
    assert asked and max(a * b for a, b in asked) == 64
    # causal: 5 query blocks see 1 + 2 + ... + 5 key blocks, forward and backward
    assert len(asked) == 2 * 15


def test_devices_follow_the_inputs(strict_device):
    """No tensor is created without the inputs' device: under meta defaults, CPU inputs still work."""
    module = component("fire").build(SHAPE)
    q = torch.randn(1, 2, 9, 4, device="cpu", requires_grad=True)
    positions = torch.arange(9, device="cpu")
    with strict_device():
        out = biased_attention(q, q, q, positions, module.bias, module.bias_params(), block=4)
        out.sum().backward()
    assert out.device.type == "cpu" and module.w1.grad is not None
