"""The segmented kernel against the naive O(L^2) references: outputs, gradients, layouts, memory."""

from __future__ import annotations

import math

import pytest
import torch

from longlab import parse
from longlab.attention.kernel import segmented_attention
from longlab.attention.merge import merge_into
from longlab.positions.rope import RopeConfig
from support import reference
from support.memory import LargestTensor

HEAD_DIM = 16
# The remap methods rotate with the model's native table; a float64 one lets float64 runs be exact.
ROPE = RopeConfig(HEAD_DIM, 10000.0, 64, reference.inv_freq(HEAD_DIM))

# (spec, reference name, reference parameters); windows of 24-40 so that lengths of 100-200 cross them
REMAPS = [
    ("rerope:window=40", "rerope", {"window": 40}),
    ("leaky_rerope:window=32,k=4", "leaky_rerope", {"window": 32, "k": 4.0}),
    ("selfextend:group=4,window=24", "selfextend", {"group": 4, "window": 24}),
    ("selfextend:group=3,window=25", "selfextend", {"group": 3, "window": 25}),
    ("lm_infinite:band=40,n_global=5", "lm_infinite", {"band": 40, "n_global": 5, "original_length": 64}),
    ("lm_infinite:band=80,n_global=3", "lm_infinite", {"band": 80, "n_global": 3, "original_length": 64}),
    ("sliding:size=30", "sliding", {"size": 30}),
    ("none", "none", {}),
    ("string:shift=40,window=8", "string", {"shift": 40, "window": 8}),
    ("string:shift=21,window=0", "string", {"shift": 21, "window": 0}),
    ("dca:chunk_size=30,local_window=6", "dca", {"chunk_size": 30, "local_window": 6}),
    ("dca:chunk_size=17,local_window=0", "dca", {"chunk_size": 17, "local_window": 0}),
    ("dca:chunk_size=48,local_window=47", "dca", {"chunk_size": 48, "local_window": 47}),
]
# methods whose segments depend on the query's own position (decoding and chunked prefill see them)
TAILS = REMAPS[:5] + REMAPS[8:]


def _inputs(batch=2, heads=4, kv_heads=2, length=97, dtype=torch.float64):
    q = torch.randn(batch, heads, length, HEAD_DIM, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, kv_heads, length, HEAD_DIM, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, kv_heads, length, HEAD_DIM, dtype=dtype, requires_grad=True)
    return q, k, v


def _ours(spec, q, k, v, q_pos, k_pos, key_valid=None, block_size=None):
    method = parse(spec)[0].resolve(ROPE)
    table = method.table(ROPE, int(q_pos.max()) + 1)
    return segmented_attention(q, k, v, q_pos, k_pos, method.segments(), table, 0.25, key_valid, block_size)


def _reference(name, params, q, k, v, q_pos, k_pos, key_valid=None):
    rows = []
    for b in range(q.shape[0]):
        visible, rel = reference.distances(name, q_pos[b], k_pos[b], **params)
        valid = None if key_valid is None else key_valid[b : b + 1]
        rows.append(
            reference.attention(
                q[b : b + 1], k[b : b + 1], v[b : b + 1], visible, rel, reference.inv_freq(HEAD_DIM), 0.25, 1.0, valid
            )
        )
    return torch.cat(rows)


@pytest.mark.parametrize("spec,name,params", REMAPS, ids=[r[0] for r in REMAPS])
@pytest.mark.parametrize("length,block", [(97, None), (131, 16), (200, 7)])
def test_remap_matches_reference_with_gradients(spec, name, params, length, block):
    q, k, v = _inputs(length=length)
    pos = torch.arange(length)[None].expand(2, -1)
    ours = _ours(spec, q, k, v, pos, pos, block_size=block)
    ref = _reference(name, params, q, k, v, pos, pos)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-9)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(ours, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("spec,name,params", TAILS, ids=[r[0] for r in TAILS])
def test_chunked_prefill_and_decoding(spec, name, params):
    """Queries that are the tail of the keys (chunked prefill, one-token decoding) see the right keys."""
    q, k, v = _inputs(length=150)
    pos = torch.arange(150)[None].expand(2, -1)
    full = _reference(name, params, q, k, v, pos, pos)
    for tail in (1, 37, 64):
        got = _ours(spec, q[:, :, -tail:], k, v, pos[:, -tail:], pos, block_size=16)
        torch.testing.assert_close(got, full[:, :, -tail:], atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("spec,name,params", REMAPS, ids=[r[0] for r in REMAPS])
def test_left_padding(spec, name, params):
    """Padded keys are invisible and every row keeps its own positions (as generate() assigns them)."""
    q, k, v = _inputs(length=120)
    valid = torch.ones(2, 120, dtype=torch.bool)
    valid[1, :43] = False
    pos = (valid.long().cumsum(-1) - 1).masked_fill(~valid, 1)
    got = _ours(spec, q, k, v, pos, pos, key_valid=valid, block_size=32)
    want = _reference(name, params, q, k, v, pos, pos, key_valid=valid)
    torch.testing.assert_close(got[0], want[0], atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(got[1, :, 43:], want[1, :, 43:], atol=1e-10, rtol=1e-9)


def test_gqa_and_float32_single_call_path():
    """The unblocked fast path (one segment, no padding) in float32 with 4 query heads per KV head."""
    q, k, v = _inputs(heads=8, kv_heads=2, length=300, dtype=torch.float32)
    pos = torch.arange(300)[None].expand(2, -1)
    ours = _ours("none", q, k, v, pos, pos)
    ref = _reference("none", {}, q, k, v, pos, pos)
    torch.testing.assert_close(ours.double(), ref, atol=2e-5, rtol=1e-4)


def test_bfloat16_close_to_reference():
    q, k, v = _inputs(length=130, dtype=torch.bfloat16)
    pos = torch.arange(130)[None].expand(2, -1)
    ours = _ours("rerope:window=40", q, k, v, pos, pos, block_size=32)
    ref = _reference("rerope", {"window": 40}, q, k, v, pos, pos)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.double(), ref, atol=3e-2, rtol=3e-2)


def test_frequency_method_with_attention_factor():
    """YaRN's attention factor multiplies cos and sin, so logits scale by its square."""
    q, k, v = _inputs(length=90)
    pos = torch.arange(90)[None].expand(2, -1)
    method = parse("yarn:factor=4").pop().resolve(ROPE)
    table = method.table(ROPE, 90)
    ours = segmented_attention(q, k, v, pos, pos, method.segments(), table, 0.25)
    visible, rel = reference.distances("none", pos[0], pos[0])
    ref = reference.attention(q, k, v, visible, rel, table.inv_freq.double(), 0.25, factor=table.attention_factor)
    assert table.attention_factor == pytest.approx(0.1 * math.log(4) + 1)
    # longlab's tables are float32 (as transformers'), so angles carry float32 rounding
    torch.testing.assert_close(ours, ref, atol=2e-6, rtol=1e-5)


def test_rows_without_keys_are_zero_and_have_zero_gradient():
    q, k, v = _inputs(length=40)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[0, :10] = False
    pos = torch.arange(40)[None].expand(2, -1)
    out = _ours("rerope:window=8", q, k, v, pos, pos, key_valid=valid, block_size=8)
    assert torch.isfinite(out).all()
    assert out[0, :, :10].abs().max() == 0
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert grads[0][0, :, :10].abs().max() == 0


def test_merge_of_empty_parts_is_empty_not_nan():
    acc = torch.zeros(1, 1, 2, 4)
    lse = torch.full((1, 1, 2), -math.inf)
    merge_into(acc, lse, torch.zeros(1, 1, 2, 4), torch.full((1, 1, 2), -math.inf))
    assert torch.isneginf(lse).all() and (acc == 0).all()
    merge_into(acc, lse, torch.ones(1, 1, 2, 4), torch.tensor([[[0.0, -math.inf]]]))
    assert acc[0, 0, 0].eq(1).all() and acc[0, 0, 1].eq(0).all() and lse[0, 0, 0] == 0


def _largest_tensor(spec: str, length: int) -> int:
    q, k, v = (torch.randn(1, 2, length, HEAD_DIM) for _ in range(3))
    valid = torch.ones(1, length, dtype=torch.bool)
    valid[0, :5] = False  # padding forces the masked, blocked path even for "none"
    pos = torch.arange(length)[None]
    with LargestTensor() as probe:
        _ours(spec, q, k, v, pos, pos, key_valid=valid)
    return probe.largest


@pytest.mark.parametrize("spec", ["rerope:window=100", "selfextend:group=4,window=64", "none"])
def test_no_quadratic_tensor_in_forward(spec):
    """No (L x L) tensor is ever created, and the largest one grows linearly with length."""
    small, large = _largest_tensor(spec, 1024), _largest_tensor(spec, 4096)
    assert large < 4096 * 4096 / 16, large
    assert large <= 4.5 * small, (small, large)
