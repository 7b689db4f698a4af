"""CoPE (Golovneva et al., 2024, eq. 3-5) against its equations written plainly, O(T^2) per (b, h, i, j),
in float64; identity (a zero table is NoPE); the model trains; no T x T tensor; devices follow inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from longlab.attention.contextual import contextual_attention
from longlab.errors import SpecError
from longlab.lab.components import component, model_spec
from longlab.lab.model import SIZES, LabModel
from support.lab import train_steps
from support.memory import LargestTensor


def reference(q, k, v, e, scale):
    """Every (b, h, i): g_it = sigmoid(q_i.k_t s); p_ij = min(sum_{t=j..i} g_it, npos - 1);
    a_ij = (q_i.k_j + (1 - w) q_i.e[floor p] + w q_i.e[ceil p]) s, w = p - floor p; softmax over j <= i."""
    b_, h_, t_, _ = q.shape
    top = e.shape[0] - 1
    rows = []
    for b in range(b_):
        for h in range(h_):
            for i in range(t_):
                qi = q[b, h, i]
                gates = [torch.sigmoid(qi @ k[b, h, t] * scale) for t in range(i + 1)]
                logits = []
                for j in range(i + 1):
                    p = torch.clamp(sum(gates[j : i + 1]), max=top)
                    lo, hi = math.floor(p.item()), math.ceil(p.item())
                    w = p - lo
                    logits.append((qi @ k[b, h, j] + (1 - w) * (qi @ e[lo]) + w * (qi @ e[hi])) * scale)
                attn = torch.softmax(torch.stack(logits), dim=0)
                rows.append(attn @ v[b, h, : i + 1])
    return torch.stack(rows).view_as(q)


def _inputs(t, d=4, npos=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (2 * torch.randn(2, 2, t, d, generator=g, dtype=torch.float64) for _ in range(3))
    e = torch.randn(npos, d, generator=g, dtype=torch.float64)
    return [x.requires_grad_() for x in (q, k, v, e)]


@pytest.mark.parametrize(("block", "npos"), [(4, 20), (8, 5), (6, 3), (64, 20)])
def test_output_and_gradients_equal_the_equations(block, npos):
    t = 19  # several blocks, the last one partial
    inputs = _inputs(t, npos=npos)
    scale = 1 / math.sqrt(4)
    ours = contextual_attention(*inputs, block=block)
    expected = reference(*inputs, scale)
    torch.testing.assert_close(ours, expected)
    grad_out = torch.randn_like(ours)
    got = torch.autograd.grad(ours, inputs, grad_out)
    want = torch.autograd.grad(expected, inputs, grad_out)
    for name, a, b in zip("qkve", got, want, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, n=name: f"d{n}: {m}")
        assert b.abs().sum() > 0


def test_zero_table_is_causal_softmax_and_a_real_one_is_not():
    q, k, v, e = _inputs(13)
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(contextual_attention(q, k, v, torch.zeros_like(e), block=4), plain)
    assert not torch.allclose(contextual_attention(q, k, v, e, block=4), plain)


def _loss(spec, ids, edit=None):
    torch.manual_seed(0)
    model = LabModel(50, SIZES["tiny"], component(spec), train_length=16)
    if edit:
        with torch.no_grad():
            edit(model.model.position)
    return model.loss(ids)


def test_the_untrained_model_is_the_nope_model():
    """The paper initialises e to zero: the CoPE model starts as the NoPE model, and a real table
    changes it (so the identity can fail)."""
    ids = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(1))
    nope = _loss("nope", ids)
    torch.testing.assert_close(_loss("cope", ids), nope)
    assert not torch.allclose(_loss("cope", ids, edit=lambda m: m.embeddings.normal_()), nope)


def test_the_model_trains_and_every_layers_table_learns():
    torch.manual_seed(0)
    model = LabModel(50, SIZES["tiny"], component("cope"), train_length=16)
    ids = torch.randint(0, 50, (4, 33), generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def every_table_learns(model):
        table = model.model.position.embeddings
        assert table.shape == (SIZES["tiny"].layers, 17, SIZES["tiny"].d_model // SIZES["tiny"].heads)
        assert all(bool(g.abs().sum() > 0) for g in table.grad)  # each layer's own table

    losses = train_steps(model, ids, optimizer, 12, every_table_learns)
    assert losses[-1] < losses[0]


def test_no_t_by_t_tensor_is_built():
    t, d, block = 256, 4, 16
    q, k, v = (torch.randn(1, 1, t, d) for _ in range(3))
    e = torch.randn(17, d)
    with torch.no_grad(), LargestTensor() as seen:
        contextual_attention(q, k, v, e, block=block)
    # the inputs and the output (t x d) are the largest tensors; blocks are block x max(block, npos)
    assert seen.largest <= t * d < t * t


def test_devices_follow_the_inputs(strict_device):
    q, k, v, e = (x.float().detach().requires_grad_() for x in _inputs(11))
    with strict_device():
        out = contextual_attention(q, k, v, e, block=4)
        out.sum().backward()
    assert out.device.type == "cpu" and e.grad is not None


def test_meta_tensors_run():
    q, k, v = (torch.empty(1, 2, 9, 4, device="meta") for _ in range(3))
    out = contextual_attention(q, k, v, torch.empty(5, 4, device="meta"), block=4)
    assert out.shape == q.shape and out.device.type == "meta"


def test_specs():
    assert component("cope:npos=64").npos == 64
    with pytest.raises(SpecError, match="'npos' must be an integer >= 1"):
        component("cope:npos=0")
    with pytest.raises(SpecError, match="cope computes its own attention"):
        model_spec("cope+sliding")
    model_spec("cope+full")


def test_the_papers_table_names_a_source_for_every_number():
    from longlab.lab.report import PAPER_ROWS, PAPERS

    for paper, _, _, numbers in PAPER_ROWS:
        assert any(ch.isdigit() for ch in paper)  # the year at least
        assert numbers.endswith("not transcribed") or "Table" in numbers
        assert paper in PAPERS
    assert any("CoPE" in row[0] for row in PAPER_ROWS)
