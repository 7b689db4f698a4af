"""Infini-attention and the Memorizing Transformer against naive references written from their papers'
equations (segment loops, brute-force top-k), outputs and gradients; identity settings (gate local-only,
top_k = 0) against in-segment attention; faiss against torch.topk; training; parameter errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from longlab.cache.far import FaissIndex, TorchIndex
from longlab.errors import SpecError
from longlab.lab.attention.memorizing import MemorizingAttention, SegmentAttention, nearest
from longlab.lab.components import component, model_spec
from longlab.lab.model import SIZES, LabModel
from longlab.lab.positions.base import ModelShape
from support.lab import train_steps

SHAPE = ModelShape(d_model=12, heads=3, head_dim=4, train_length=8, layers=2)


def _inputs(t=29, d=4, dtype=torch.float64):
    return tuple(torch.randn(2, 3, t, d, dtype=dtype, requires_grad=True) for _ in range(3))


def naive_segment(q, k, v, segment):
    """softmax over keys j <= i of query i's own segment (floor(j / segment) == floor(i / segment))."""
    t = q.shape[2]
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    allowed = (j <= i) & (i // segment == j // segment)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~allowed, -math.inf)
    return torch.softmax(scores, -1) @ v


def naive_infini(q, k, v, beta, segment, delta):
    """Munkhdalai et al. 2024, eq. 3-6, one segment at a time, sums over tokens written out."""
    sigma = lambda x: F.elu(x) + 1  # noqa: E731
    b, h, t, d = q.shape
    local = naive_segment(q, k, v, segment)
    memory, norm = torch.zeros(b, h, d, d, dtype=q.dtype), torch.zeros(b, h, d, dtype=q.dtype)
    gate = torch.sigmoid(beta)[:, None]
    out = []
    for a in range(0, t, segment):
        z = min(a + segment, t)
        for i in range(a, z):  # eq. 3 per query, then eq. 6
            sq = sigma(q[:, :, i])
            a_mem = torch.einsum("bhd,bhde->bhe", sq, memory) / ((sq * norm).sum(-1, keepdim=True) + 1e-6)
            out.append(gate * a_mem + (1 - gate) * local[:, :, i])
        new_memory, new_norm = memory, norm
        for i in range(a, z):  # eq. 4 (linear) or eq. 5 (delta), token by token of the segment
            sk = sigma(k[:, :, i])
            value = v[:, :, i]
            if delta:
                value = value - torch.einsum("bhd,bhde->bhe", sk, memory) / ((sk * norm).sum(-1, keepdim=True) + 1e-6)
            new_memory = new_memory + sk[..., :, None] * value[..., None, :]
            new_norm = new_norm + sk
        memory, norm = new_memory, new_norm
    return torch.stack(out, dim=2)


def naive_memorizing(q, k, v, gate, segment, memory_tokens, top_k):
    """Wu et al. 2022, §3.2, per query: brute-force top_k over the detached keys of the newest
    memory_tokens tokens of earlier segments, softmax over them, V_m * g + V_c * (1 - g)."""
    b, h, t, d = q.shape
    local = naive_segment(q, k, v, segment)
    g = torch.sigmoid(gate)
    out = torch.zeros_like(local)
    for bi in range(b):
        for hi in range(h):
            for i in range(t):
                a = i // segment * segment
                start = max(0, a - memory_tokens)
                if a == 0 or top_k == 0:
                    out[bi, hi, i] = local[bi, hi, i]
                    continue
                keys, values = k[bi, hi, start:a].detach(), v[bi, hi, start:a].detach()
                scores = keys @ q[bi, hi, i]
                top = torch.sort(scores.detach(), descending=True).indices[:top_k]
                v_m = torch.softmax(scores[top] / math.sqrt(d), 0) @ values[top]
                out[bi, hi, i] = v_m * g[hi] + local[bi, hi, i] * (1 - g[hi])
    return out


def _check(ours, reference, inputs):
    torch.testing.assert_close(ours, reference)
    grad = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(reference, inputs, grad), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("update", ["linear", "delta"])
@pytest.mark.parametrize("segment", [1, 7, 32])
def test_infini_equals_its_equations(update, segment):
    q, k, v = _inputs()
    module = component(f"infini:segment={segment},update={update}").build(SHAPE, 0).double()
    with torch.no_grad():
        module.beta.copy_(torch.tensor([-1.0, 0.3, 2.0]))
    ours = module(q, k, v, torch.arange(29))
    reference = naive_infini(q, k, v, module.beta, segment, update == "delta")
    _check(ours, reference, (q, k, v, module.beta))


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_infini_with_a_local_only_gate_is_in_segment_attention(update):
    q, k, v = _inputs()
    module = component(f"infini:segment=8,update={update}").build(SHAPE, 0).double()
    with torch.no_grad():
        module.beta.fill_(-math.inf)  # sigmoid(beta) = 0: the memory's share is exactly 0
    _check(module(q, k, v, torch.arange(29)), naive_segment(q, k, v, 8), (q, k, v))


def test_infini_memory_reaches_earlier_segments():
    q, k, v = _inputs()
    module = component("infini:segment=8").build(SHAPE, 0).double()
    out = module(q, k, v, torch.arange(29))
    grad_k = torch.autograd.grad(out[:, :, 20:].sum(), k)[0]
    assert grad_k[:, :, :8].abs().sum() > 0  # segment 3 depends on segment 1 through M, with gradient


@pytest.mark.parametrize(("segment", "memory_tokens", "top_k"), [(8, 2048, 5), (8, 10, 3), (6, 6, 50), (5, 100, 1)])
def test_memorizing_equals_brute_force_top_k(segment, memory_tokens, top_k):
    q, k, v = _inputs()
    module = MemorizingAttention(segment, memory_tokens, top_k, heads=3).double()
    with torch.no_grad():
        module.gate.copy_(torch.tensor([-1.0, 0.3, 2.0]))
    ours = module(q, k, v, torch.arange(29))
    reference = naive_memorizing(q, k, v, module.gate, segment, memory_tokens, top_k)
    _check(ours, reference, (q, k, v, module.gate))


def test_memorizing_identities_are_in_segment_attention():
    q, k, v = _inputs()
    no_memory = MemorizingAttention(8, 64, 0, heads=3).double()
    _check(no_memory(q, k, v, torch.arange(29)), naive_segment(q, k, v, 8), (q, k, v))
    module = MemorizingAttention(8, 64, 4, heads=3).double()
    with torch.no_grad():
        module.gate.fill_(-math.inf)  # sigmoid = 0: local only
    _check(module(q, k, v, torch.arange(29)), naive_segment(q, k, v, 8), (q, k, v))
    with torch.no_grad():
        mixed = MemorizingAttention(8, 64, 4, heads=3).double()(q, k, v, torch.arange(29))
        assert not torch.allclose(mixed, naive_segment(q, k, v, 8))


def test_faiss_and_torch_topk_find_the_same_keys():
    torch.manual_seed(1)
    queries, keys = torch.randn(6, 16, 8), torch.randn(6, 200, 8)
    faiss_slots = nearest(queries, keys, 10, FaissIndex)
    torch_slots = nearest(queries, keys, 10, TorchIndex)
    assert faiss_slots.shape == (6, 16, 10)
    torch.testing.assert_close(faiss_slots, torch_slots)
    brute = (queries @ keys.transpose(1, 2)).topk(10, dim=-1).indices
    torch.testing.assert_close(torch_slots, brute)


def test_memory_modules_run_on_the_meta_device():
    q, k, v = (torch.empty(2, 3, 70, 4, device="meta") for _ in range(3))
    for module in (component("infini:update=delta").build(SHAPE, 0), MemorizingAttention(32, 40, 8, heads=3)):
        out = module.to("meta")(q, k, v, torch.arange(70, device="meta"))
        assert out.shape == (2, 3, 70, 4) and out.device.type == "meta"


def test_memorizing_layer_placement():
    four = ModelShape(d_model=12, heads=3, head_dim=4, train_length=8, layers=4)
    kinds = [type(component("memorizing").build(four, layer)) for layer in range(4)]
    assert kinds == [SegmentAttention, SegmentAttention, MemorizingAttention, SegmentAttention]
    assert type(component("memorizing:layer=0").build(four, 0)) is MemorizingAttention
    with pytest.raises(SpecError, match="'layer' must be an integer >= -4 and <= 3 for a model of 4 layers, got 4"):
        component("memorizing:layer=4").build(four, 0)


@pytest.mark.parametrize(
    "spec", ["rope+infini:segment=8", "rope+infini:segment=8,update=delta", "rope+memorizing:segment=8"]
)
def test_the_model_trains(spec):
    torch.manual_seed(0)
    position, attention = model_spec(spec)
    model = LabModel(50, SIZES["tiny"], position, train_length=16, attention=attention)
    ids = torch.randint(0, 50, (2, 40))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = train_steps(model, ids, optimizer, 15)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.5
    gates = [p for n, p in model.named_parameters() if n.endswith(("beta", "gate"))]
    assert gates and all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates)


def test_bad_parameters():
    for spec, message in [
        ("rope+infini:segment=0", "'segment' must be an integer >= 1"),
        ("rope+infini:update=gated", "'update' must be one of linear, delta, got 'gated'"),
        ("rope+memorizing:top_k=-1", "'top_k' must be an integer >= 0"),
        ("rope+memorizing:memory_tokens=0", "'memory_tokens' must be an integer >= 1"),
        ("rope+memorizing:segment=1.5", "'segment' must be an integer"),
    ]:
        with pytest.raises(SpecError, match=message):
            model_spec(spec)


def test_the_memory_preset_parses():
    from longlab.lab.presets import PRESETS

    for spec in PRESETS["memory"]:
        model_spec(spec)
