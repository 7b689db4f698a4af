"""Kernelized attention (performer, cosformer, and linear on the same shared loop) against their papers'
equations written plainly as O(T^2) matrices, output and gradients; recurrent decoding against the
parallel form; Performer's estimate against exact softmax; identity settings; errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from longlab.errors import LonglabError, SpecError
from longlab.lab.attention.performer import draw_seed, orthogonal_features
from longlab.lab.components import component, model_spec
from longlab.lab.model import SIZES, LabModel
from longlab.lab.positions.base import ModelShape
from support.lab import train_steps

T = 23  # not a multiple of the chunks below
SHAPE = ModelShape(d_model=32, heads=4, head_dim=8, train_length=8, layers=2)


def _inputs(t=T, d=8, dtype=torch.float64, scale=1.0):
    torch.manual_seed(0)
    return tuple((scale * torch.randn(2, 3, t, d, dtype=dtype)).requires_grad_() for _ in range(3))


def _causal(t, dtype=torch.float64):
    return torch.ones(t, t, dtype=dtype).tril()


def naive_performer(q, k, v, w):
    """Choromanski et al. 2021, eq. 5-7: A_ij = phi(q_i).phi(k_j) with phi(x) = exp(w.x - |x|^2/2)/sqrt(m)
    of x scaled by d^-1/4; out_i = sum_{j<=i} A_ij v_j / sum_{j<=i} A_ij. No stabilisation."""
    d, m = q.shape[-1], w.shape[0]

    def phi(x):
        x = x / d**0.25
        return torch.exp(x @ w.T - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(m)

    a = (phi(q) @ phi(k).transpose(-1, -2)) * _causal(q.shape[2], q.dtype)
    return (a @ v) / a.sum(-1, keepdim=True)


def naive_cosformer(q, k, v, horizon, eps):
    """Qin et al. 2022, eq. 9: s_ij = relu(q_i).relu(k_j) cos(pi/2 (i - j)/M), j <= i, normalised."""
    t = q.shape[2]
    i, j = torch.arange(t, dtype=q.dtype)[:, None], torch.arange(t, dtype=q.dtype)[None, :]
    reweight = torch.cos(math.pi / 2 * (i - j) / horizon)
    s = (torch.relu(q) @ torch.relu(k).transpose(-1, -2)) * reweight * _causal(t, q.dtype)
    return (s @ v) / (s.sum(-1, keepdim=True) + eps)


def naive_relu_linear(q, k, v, eps):
    a = (torch.relu(q) @ torch.relu(k).transpose(-1, -2)) * _causal(q.shape[2])
    return (a @ v) / (a.sum(-1, keepdim=True) + eps)


def _check(ours, reference, inputs):
    torch.testing.assert_close(ours, reference)
    grad = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(reference, inputs, grad), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_performer_equals_its_equation(chunk):
    q, k, v = _inputs()
    module = component(f"performer:features=32,chunk={chunk},eps=0").build(SHAPE, 1)
    _check(module(q, k, v, torch.arange(T)), naive_performer(q, k, v, module.projection.double()), (q, k, v))


@pytest.mark.parametrize(("chunk", "horizon"), [(1, 0), (5, 0), (64, 0), (5, 40)])
def test_cosformer_equals_its_equation(chunk, horizon):
    q, k, v = _inputs()
    module = component(f"cosformer:chunk={chunk},horizon={horizon}").build(SHAPE, 0)
    _check(module(q, k, v, torch.arange(T)), naive_cosformer(q, k, v, horizon or T, 1e-6), (q, k, v))


def test_cosformer_without_reweighting_is_relu_linear_attention():
    q, k, v = _inputs()
    module = component("cosformer:reweight=false,chunk=5").build(SHAPE, 0)
    _check(module(q, k, v, torch.arange(T)), naive_relu_linear(q, k, v, 1e-6), (q, k, v))
    # and a horizon far beyond the sequence makes the cosine ~1: the same attention
    far = component("cosformer:horizon=1000000000,chunk=5").build(SHAPE, 0)(q, k, v, torch.arange(T))
    torch.testing.assert_close(far, naive_relu_linear(q, k, v, 1e-6))


@pytest.mark.parametrize(
    ("spec", "length"),
    [
        ("linear:chunk=5", None),
        ("performer:chunk=5,eps=0", None),
        ("cosformer:chunk=5", T),
        ("cosformer:horizon=40", None),
    ],
)
def test_recurrent_decoding_equals_the_parallel_form(spec, length):
    q, k, v = (x.detach() for x in _inputs())
    module = component(spec).build(SHAPE, 0)
    parallel = module(q, k, v, torch.arange(T))
    decoder = module.recurrent(length)
    steps = []
    for i in range(T):
        steps.append(decoder.step(q[:, :, i], k[:, :, i], v[:, :, i]))
        size = decoder.state.shape
    torch.testing.assert_close(torch.stack(steps, dim=2), parallel)
    assert size == decoder.state.shape  # constant memory: the state never grew


def _softmax(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_performer_approaches_softmax_attention_as_features_grow():
    q, k, v = (x.detach() for x in _inputs(t=64, scale=0.5))
    exact = _softmax(q, k, v)
    errors = {}
    for m in (16, 4096):
        module = component(f"performer:features={m},seed=3").build(SHAPE, 0)
        errors[m] = (module(q, k, v, torch.arange(64)) - exact).abs().mean().item()
    assert errors[4096] < errors[16] / 4, errors  # Monte Carlo error ~ 1/sqrt(m): 16x fewer at 256x the features


def test_the_kernel_estimate_is_unbiased():
    """E[phi(x).phi(y)] = exp(x.y) over the random (orthogonal) features: the mean of 2000 independent draws
    lies within 4 standard errors of the exact kernel, for three pairs."""
    torch.manual_seed(1)
    x, y = 0.6 * torch.randn(3, 8, dtype=torch.float64), 0.6 * torch.randn(3, 8, dtype=torch.float64)
    estimates = []
    for draw in range(2000):
        w = orthogonal_features(8, 8, torch.Generator().manual_seed(draw_seed(7, 0, draw)))
        phi = lambda z: torch.exp(z @ w.T - (z * z).sum(-1, keepdim=True) / 2) / math.sqrt(8)  # noqa: E731, B023
        estimates.append((phi(x) * phi(y)).sum(-1))
    estimates = torch.stack(estimates)
    exact = torch.exp((x * y).sum(-1))
    error = estimates.std(0) / math.sqrt(len(estimates))
    assert ((estimates.mean(0) - exact).abs() < 4 * error).all(), (estimates.mean(0), exact, error)


def test_orthogonal_features_are_orthogonal_within_a_block():
    w = orthogonal_features(20, 8, torch.Generator().manual_seed(0))
    for block in (w[:8], w[8:16], w[16:]):
        gram = block @ block.T
        torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)))
    assert w.shape == (20, 8)


def test_performer_stays_finite_where_the_plain_equation_overflows():
    q, k, v = (x.detach().float() for x in _inputs(scale=30.0))
    module = component("performer").build(SHAPE, 0)
    assert not torch.isfinite(naive_performer(q, k, v, module.projection)).all()
    assert torch.isfinite(module(q, k, v, torch.arange(T))).all()


def test_performer_features_are_per_layer_seeded_and_redrawn_deterministically():
    spec = component("performer:redraw=2,seed=5")
    a, b, other_layer = spec.build(SHAPE, 0), spec.build(SHAPE, 0), spec.build(SHAPE, 1)
    torch.testing.assert_close(a.projection, b.projection)
    assert not torch.allclose(a.projection, other_layer.projection)
    first = a.projection.clone()
    q, k, v = (x.detach().float() for x in _inputs())
    a.train()
    a(q, k, v, torch.arange(T))
    a(q, k, v, torch.arange(T))
    torch.testing.assert_close(a.projection, first)  # steps 0 and 1 use draw 0
    a(q, k, v, torch.arange(T))  # step 2: draw 1
    assert not torch.allclose(a.projection, first)
    b.load_state_dict(a.state_dict())  # a checkpoint carries the features and the step count
    for module in (a, b):
        module(q, k, v, torch.arange(T))
        module(q, k, v, torch.arange(T))  # step 4: draw 2
    torch.testing.assert_close(a.projection, b.projection)
    fixed = component("performer").build(SHAPE, 0).train()
    before = fixed.projection.clone()
    for _ in range(3):
        fixed(q, k, v, torch.arange(T))
    torch.testing.assert_close(fixed.projection, before)  # redraw=0: never redrawn


@pytest.mark.parametrize("spec", ["performer", "cosformer"])
def test_runs_on_the_meta_device(spec):
    module = component(spec).build(SHAPE, 0).to("meta")
    q, k, v = (torch.empty(2, 4, 70, 8, device="meta") for _ in range(3))
    assert module(q, k, v, torch.arange(70, device="meta")).shape == (2, 4, 70, 8)


@pytest.mark.parametrize("spec", ["rope+performer", "rope+cosformer", "rope+performer:redraw=3"])
def test_model_trains(spec):
    torch.manual_seed(0)
    position, attention = model_spec(spec)
    model = LabModel(50, SIZES["tiny"], position, train_length=16, attention=attention)
    ids = torch.randint(0, 50, (2, 30))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def finite_gradients(model):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

    losses = train_steps(model, ids, optimizer, 15, finite_gradients)
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("performer:features=0", "'features' must be an integer >= 1"),
        ("performer:redraw=-1", "'redraw' must be an integer >= 0"),
        ("performer:eps=2", "'eps' must be a number >= 0 and <= 1"),
        ("performer:chunk=0", "'chunk' must be an integer >= 1"),
        ("cosformer:horizon=-4", "'horizon' must be an integer >= 0"),
        ("cosformer:eps=0", "'eps' must be a number > 0 and <= 1"),
        ("cosformer:reweight=maybe", "'reweight' must be true or false"),
    ],
)
def test_bad_parameters_are_refused(spec, message):
    with pytest.raises(SpecError, match=message):
        component(spec)


def test_cosformer_refuses_sequences_beyond_its_horizon():
    q, k, v = _inputs()
    with pytest.raises(LonglabError, match="23 tokens exceeds horizon M = 16"):
        component("cosformer:horizon=16").build(SHAPE, 0)(q, k, v, torch.arange(T))
    with pytest.raises(LonglabError, match="needs the total length"):
        component("cosformer").build(SHAPE, 0).recurrent()


class _LargestResult(torch.overrides.TorchFunctionMode):
    """Records the largest trailing (rows x columns) of any tensor a torch function returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 2:
                self.largest = max(self.largest, t.shape[-1] * t.shape[-2])
        return out


@pytest.mark.parametrize("spec", ["linear", "performer:features=32", "cosformer"])
def test_no_length_by_length_matrix_is_built(spec):
    t = 512
    q, k, v = (torch.randn(1, 2, t, 8, requires_grad=True) for _ in range(3))
    module = component(spec).build(SHAPE, 0)
    with _LargestResult() as mode:
        module(q, k, v, torch.arange(t)).sum().backward()
    assert mode.largest <= t * 32  # T x features at most (a T x T matrix would be 16x that)
