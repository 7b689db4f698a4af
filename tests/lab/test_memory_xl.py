"""The memory family's segment recurrence and fixed-size caches against plainly written references:
``xl`` against an explicit segment-by-segment loop keeping the previous keys/values (float64, outputs
and gradients, the stop-gradient included); identities (``xl`` with no memory = ``segment``; one segment
covering the sequence = full causal attention); the averages against their equations and their
recurrent decoding forms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from longlab.errors import SpecError
from longlab.lab.attention.cumulative_average import CumulativeAverageState
from longlab.lab.attention.moving_average import MovingAverageState
from longlab.lab.components import component, model_spec
from longlab.lab.model import SIZES, LabModel
from longlab.lab.positions.base import ModelShape
from support.lab import train_steps

SHAPE = ModelShape(d_model=16, heads=4, head_dim=4, train_length=8, layers=2)
T = 23


def _inputs(t=T, d=8, dtype=torch.float64):
    torch.manual_seed(1)
    return tuple(torch.randn(2, 3, t, d, dtype=dtype, requires_grad=True) for _ in range(3))


def _run(spec, q, k, v):
    return component(spec).build(SHAPE, 0)(q, k, v, torch.arange(q.shape[2]))


def recurrent_xl(q, k, v, segment, memory):
    """Transformer-XL as a stream (Dai et al., 2019, §3.2): segment after segment, each attending to
    [SG(mems), its own keys] causally, then mems = last ``memory`` of cat(mems, segment keys), detached
    (XL's ``_update_mems``). Softmax written out, one segment at a time."""
    t, d = q.shape[2], q.shape[-1]
    mem_k = k[:, :, :0].detach()
    mem_v = v[:, :, :0].detach()
    outs = []
    for a in range(0, t, segment):
        z = min(a + segment, t)
        keys, values = torch.cat([mem_k, k[:, :, a:z]], 2), torch.cat([mem_v, v[:, :, a:z]], 2)
        held = mem_k.shape[2]
        scores = q[:, :, a:z] @ keys.transpose(-1, -2) / math.sqrt(d)
        for r in range(z - a):  # query a + r sees the memory and its segment's keys up to itself
            scores[:, :, r, held + r + 1 :] = -math.inf
        outs.append(torch.softmax(scores, -1) @ values)
        if memory:
            mem_k = torch.cat([mem_k, k[:, :, a:z]], 2)[:, :, -memory:].detach()
            mem_v = torch.cat([mem_v, v[:, :, a:z]], 2)[:, :, -memory:].detach()
    return torch.cat(outs, 2)


def _check(ours, reference, inputs):
    torch.testing.assert_close(ours, reference)
    grad = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(reference, inputs, grad), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("segment", "memory"), [(5, 5), (5, 3), (4, 11), (1, 2), (8, 0), (30, 4)])
def test_xl_equals_the_recurrence(segment, memory):
    q, k, v = _inputs()
    _check(_run(f"xl:segment={segment},memory={memory}", q, k, v), recurrent_xl(q, k, v, segment, memory), (q, k, v))


def test_xl_sends_no_gradient_into_the_previous_segment():
    q, k, v = _inputs()
    out = _run("xl:segment=8,memory=8", q, k, v)
    later = out[:, :, 8:16].sum()  # the second segment only: it reads the first through the memory
    _, dk, dv = torch.autograd.grad(later, (q, k, v))
    assert torch.count_nonzero(dk[:, :, :8]) == 0 and torch.count_nonzero(dv[:, :, :8]) == 0
    assert torch.count_nonzero(dk[:, :, 8:16]) > 0 and torch.count_nonzero(dv[:, :, 8:16]) > 0
    # ... while the forward does read the memory: changing the first segment's values changes it
    v2 = v.detach().clone()
    v2[:, :, :8] += 1.0
    assert not torch.allclose(_run("xl:segment=8,memory=8", q, k, v2)[:, :, 8:16], out[:, :, 8:16])


def test_xl_without_memory_is_segment():
    q, k, v = _inputs()
    _check(_run("xl:segment=6,memory=0", q, k, v), _run("segment:segment=6", q, k, v), (q, k, v))
    assert not torch.allclose(_run("xl:segment=6,memory=6", q, k, v), _run("segment:segment=6", q, k, v))


@pytest.mark.parametrize("segment", [T, 64])
def test_one_segment_covering_the_sequence_is_full_attention(segment):
    q, k, v = _inputs(dtype=torch.float32)
    for spec in (f"segment:segment={segment}", f"xl:segment={segment},memory=9"):
        _check(_run(spec, q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v))


def test_segments_do_not_see_each_other():
    q, k, v = _inputs()
    out = _run("segment:segment=8", q, k, v)
    v2 = v.detach().clone()
    v2[:, :, :8] += 1.0
    torch.testing.assert_close(_run("segment:segment=8", q, k, v2)[:, :, 8:], out[:, :, 8:])


def naive_moving_average(v, window):
    """Mem_i's value: the mean of v_j over max(0, i - window + 1) <= j <= i, one token at a time."""
    rows = [v[:, :, max(0, i - window + 1) : i + 1].mean(2) for i in range(v.shape[2])]
    return torch.stack(rows, 2)


def naive_cumulative_average(v):
    """Mem_i's value: sum_{j<=i} v_j / (i + 1)."""
    return torch.stack([v[:, :, : i + 1].sum(2) / (i + 1) for i in range(v.shape[2])], 2)


@pytest.mark.parametrize("window", [1, 4, 32])
def test_moving_average_equals_its_equation(window):
    q, k, v = _inputs()
    _check(_run(f"moving_average:window={window}", q, k, v), naive_moving_average(v, window), (v,))


def test_cumulative_average_equals_its_equation():
    q, k, v = _inputs()
    _check(_run("cumulative_average", q, k, v), naive_cumulative_average(v), (v,))


def test_a_window_covering_the_sequence_is_the_cumulative_average():
    q, k, v = _inputs()
    torch.testing.assert_close(_run(f"moving_average:window={T}", q, k, v), _run("cumulative_average", q, k, v))


@pytest.mark.parametrize(
    ("spec", "state"),
    [("moving_average:window=5", MovingAverageState(5)), ("cumulative_average", CumulativeAverageState())],
)
def test_recurrent_decoding_equals_the_parallel_form(spec, state):
    q, k, v = (x.detach() for x in _inputs())
    parallel = _run(spec, q, k, v)
    steps = torch.stack([state.step(q[:, :, i], k[:, :, i], v[:, :, i]) for i in range(T)], dim=2)
    torch.testing.assert_close(steps, parallel)


def test_cumulative_state_is_one_pair_and_follows_the_recursive_formula():
    state = CumulativeAverageState()
    _, k, v = (x.detach() for x in _inputs())
    for i in range(T):
        state.step(k[:, :, i], k[:, :, i], v[:, :, i])
    torch.testing.assert_close(state.key, k.mean(2))  # Mem_i = ((k_i, v_i) + i Mem_{i-1}) / (i+1) = the mean
    assert state.value.shape == (2, 3, 8)


def test_moving_state_holds_the_window_only():
    state = MovingAverageState(4)
    _, k, v = (x.detach() for x in _inputs())
    for i in range(T):
        state.step(k[:, :, i], k[:, :, i], v[:, :, i])
    assert len(state.pairs) == 4


@pytest.mark.parametrize(
    "spec", ["segment:segment=4", "xl:segment=4,memory=6", "moving_average:window=3", "cumulative_average"]
)
def test_meta_device(spec):
    q, k, v = (torch.empty(1, 2, 19, 4, device="meta") for _ in range(3))
    assert _run(spec, q, k, v).shape == (1, 2, 19, 4)


def _loss(spec, ids):
    torch.manual_seed(0)
    position, attention = model_spec(spec)
    model = LabModel(50, SIZES["tiny"], position, train_length=16, attention=attention)
    return model, model.loss(ids)


def test_model_identities():
    ids = torch.randint(0, 50, (2, 30))
    torch.testing.assert_close(_loss("rope+xl:segment=8,memory=0", ids)[1], _loss("rope+segment:segment=8", ids)[1])
    torch.testing.assert_close(_loss("rope+segment:segment=30", ids)[1], _loss("rope", ids)[1])
    assert not torch.allclose(_loss("rope+xl:segment=8,memory=8", ids)[1], _loss("rope+segment:segment=8", ids)[1])


@pytest.mark.parametrize(
    "spec", ["rope+segment", "rope+xl:segment=8,memory=8", "rope+moving_average", "rope+cumulative_average"]
)
def test_the_model_trains(spec):
    ids = torch.randint(0, 50, (4, 32))
    model, first = _loss(spec, ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, ids, optimizer, 15)
    assert all(p.grad is not None for p in model.parameters())
    assert model.loss(ids).item() < first.item() - 0.5


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("rope+segment:segment=0", "'segment' must be an integer >= 1"),
        ("rope+xl:memory=-1", "'memory' must be an integer >= 0"),
        ("rope+xl:segment=2.5", "'segment' must be an integer"),
        ("rope+moving_average:window=0", "'window' must be an integer >= 1"),
        ("alibi+xl", "cannot add alibi's position bias"),
    ],
)
def test_bad_parameters_are_refused(spec, message):
    with pytest.raises(SpecError, match=message):
        model_spec(spec)


def test_xl_layer_projects_its_memory_from_stop_gradient_hidden_states():
    """One lab attention layer with ``xl`` against XL's recurrence written per segment: memory keys and
    values are W_k SG(h), W_v SG(h) of the preceding tokens, so the gradient reaches the projection
    weights through the memory but never the earlier tokens' hidden states (Dai et al., 2019, §3.2)."""
    from longlab.lab.model import Attention, Size
    from longlab.lab.positions.nope import NoPE

    torch.manual_seed(3)
    size, segment, memory, t = Size(d_model=8, layers=1, heads=2, mlp=8), 4, 3, 11
    shape = ModelShape(d_model=8, heads=2, head_dim=4, train_length=8)
    layer = Attention(size, NoPE().build(shape), component(f"xl:segment={segment},memory={memory}").build(shape, 0))
    layer = layer.double()
    x = torch.randn(1, t, 8, dtype=torch.float64, requires_grad=True)
    ours = layer(x, torch.arange(t))

    w_q, w_k, w_v = layer.qkv.weight.split(8)
    heads = lambda y: y.view(y.shape[0], -1, 2, 4).transpose(1, 2)  # noqa: E731
    outs = []
    for start in range(0, t, segment):
        end, first = min(start + segment, t), max(0, start - memory)
        now, before = x[:, start:end], x[:, first:start].detach()  # SG(m): the earlier hidden states
        q = heads(now @ w_q.T)
        k = heads(torch.cat([before, now], 1) @ w_k.T)
        v = heads(torch.cat([before, now], 1) @ w_v.T)
        mask = torch.ones(end - start, end - first, dtype=torch.bool).tril(start - first)
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    reference = layer.out(torch.cat(outs, 2).transpose(1, 2).reshape(1, t, 8))

    torch.testing.assert_close(ours, reference)
    grad = torch.randn_like(ours)
    mine = torch.autograd.grad(ours, (x, layer.qkv.weight), grad)
    theirs = torch.autograd.grad(reference, (x, layer.qkv.weight), grad)
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b)
