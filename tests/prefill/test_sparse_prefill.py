"""Sparse prefill (minference, xattention) against naive O(L^2) references written from the papers.

Pattern estimation is checked against the equations computed on the full attention matrix; the
sparse attention against naive attention with the pattern applied as an explicit (L x L) mask, under
several position methods (segments); identity settings against the dense kernel; and the bridge
through models (bundled and random) with position and cache methods composed.
"""

from __future__ import annotations

import math

import pytest
import torch

import longlab
from longlab import parse
from longlab.attention.kernel import segmented_attention
from longlab.errors import LonglabError, SpecError
from longlab.positions.rope import RopeConfig
from longlab.prefill import sparse as sparse_module
from longlab.prefill.minference import LOCAL_OFFSETS, SINK_KEYS, MInference
from longlab.prefill.xattention import XAttention
from support import reference
from support.models import build

HEAD_DIM = 16
ROPE = RopeConfig(HEAD_DIM, 10000.0, 64, reference.inv_freq(HEAD_DIM))
SCALE = HEAD_DIM**-0.5
POSITIONS = [
    ("none", "none", {}),
    ("selfextend:group=4,window=24", "selfextend", {"group": 4, "window": 24}),
    ("rerope:window=40", "rerope", {"window": 40}),
    ("dca:chunk_size=30,local_window=6", "dca", {"chunk_size": 30, "local_window": 6}),
]


def _inputs(tq: int, tk: int, hq: int = 4, hk: int = 2, batch: int = 2):
    q = torch.randn(batch, hq, tq, HEAD_DIM, dtype=torch.float64)
    k = torch.randn(batch, hk, tk, HEAD_DIM, dtype=torch.float64)
    v = torch.randn(batch, hk, tk, HEAD_DIM, dtype=torch.float64)
    k_pos = torch.arange(tk)[None].expand(batch, tk)
    return q, k, v, k_pos[:, tk - tq :], k_pos


def _method(spec: str):
    (position,) = parse(spec)
    position = position.resolve(ROPE)
    return position.segments(), position.table(ROPE, 10**4)


def _naive_logits(q, k, name, params, q_pos, k_pos, causal=True):
    """(B, Hq, Tq, Tk) logits from the paper's distance formula (reference), causal, -inf elsewhere."""
    visible, rel = reference.distances(name, q_pos[0], k_pos[0], **params)
    rotated = reference.rotate_pairwise(q.double(), rel, reference.inv_freq(HEAD_DIM))
    keys = k.double().repeat_interleave(q.shape[1] // k.shape[1], 1)
    logits = torch.einsum("bhqkd,bhkd->bhqk", rotated, keys) * SCALE
    return logits.masked_fill(~visible, -math.inf) if causal else logits


def _naive_attention(q, k, v, name, params, q_pos, k_pos, allowed):
    """Naive attention with ``allowed`` (B, Hq, Tq, Tk) as an explicit mask on top of the method's."""
    logits = _naive_logits(q, k, name, params, q_pos, k_pos).masked_fill(~allowed, -math.inf)
    probabilities = torch.softmax(logits, -1).nan_to_num(0.0)
    return probabilities @ v.double().repeat_interleave(q.shape[1] // k.shape[1], 1)


def _tile(j: int, size: int, tk: int) -> int:
    """Key tiles of ``size`` aligned to the end of the keys (the last tile ends at key tk - 1)."""
    return (j + (-tk) % size) // size


def _block_of(i: int, size: int, tq: int) -> int:
    return (i + (-tq) % size) // size


# -- estimation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, name, params", POSITIONS[:2])
def test_vertical_slash_estimate_matches_the_papers_scores(spec, name, params):
    """MInference section 3.2: vertical score = attention of the last queries summed per key; slash
    score summed per diagonal offset i - j; top-k of each, sinks and local offsets forced."""
    tq = tk = 200
    q, k, _, q_pos, k_pos = _inputs(tq, tk)
    segments, table = _method(spec)
    method = MInference(min_length=2, vertical=SINK_KEYS + 12, slash=LOCAL_OFFSETS + 15, last_q=16)
    verticals, slashes = method.estimate(q, k, q_pos, k_pos, None, segments, table, SCALE)
    probabilities = torch.softmax(_naive_logits(q, k, name, params, q_pos, k_pos)[:, :, -16:], -1)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            vertical = probabilities[b, h].sum(0)
            slash = torch.zeros(tk, dtype=torch.float64)
            for r in range(tq - 16, tq):
                for j in range(r + 1):
                    slash[r - j] += probabilities[b, h, r - (tq - 16), j]
            vertical[:SINK_KEYS] = 16 + torch.arange(SINK_KEYS, 0, -1)  # forced, first keys first
            slash[:LOCAL_OFFSETS] = 16 + torch.arange(LOCAL_OFFSETS, 0, -1)  # forced, nearest first
            assert set(verticals[b, h].tolist()) == set(vertical.topk(SINK_KEYS + 12).indices.tolist())
            assert set(slashes[b, h].tolist()) == set(slash.topk(LOCAL_OFFSETS + 15).indices.tolist())


@pytest.mark.parametrize("threshold", [0.3, 0.8])
def test_xattention_block_scores_and_selection_match_antidiagonal_sums(threshold):
    """XAttention eq. 1-3: per (query tile, key tile), strided antidiagonal sums of the logits / S,
    soft-maxed per strided row, summed per tile; keep the fewest tiles reaching threshold of the mass."""
    size, stride, tq = 32, 4, 192
    q, k, _, q_pos, k_pos = _inputs(tq, tq)
    segments, table = _method("none")
    method = XAttention(min_length=2, threshold=threshold, stride=stride, block=size)
    scores = method.block_scores(q, k, q_pos, k_pos, None, segments, table, SCALE)
    # the diagonal strided entry sums its whole antidiagonal, future pairs included (as the authors' code)
    logits = _naive_logits(q, k, "none", {}, q_pos, k_pos, causal=False) / stride
    n = tq // stride
    strided = torch.zeros(*q.shape[:2], n, n, dtype=torch.float64)
    for t in range(stride):  # entry (r, c) = sum_t logit[rS + S - 1 - t, cS + t]
        strided += logits[:, :, stride - 1 - t :: stride, t::stride]
    strided = strided.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
    per = size // stride
    want = torch.softmax(strided, -1).view(*q.shape[:2], tq // size, per, tq // size, per).sum((3, 5))
    torch.testing.assert_close(scores.double(), want, atol=1e-5, rtol=1e-5)
    kept = method.select(q, k, q_pos, k_pos, None, segments, table, SCALE).tiles
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(tq // size):
                row, chosen, total = want[b, h, i].tolist(), {0, i}, 0.0
                for j in sorted(range(len(row)), key=lambda j: -row[j]):
                    if total >= threshold * sum(row):
                        break
                    chosen.add(j)
                    total += row[j]
                assert set(kept[b, h, i].nonzero().flatten().tolist()) == chosen


# -- sparse attention = naive attention with the pattern as an explicit mask ---------------------


def _vertical_slash_mask(verticals, slashes, size, tq, tk):
    """The minference pattern from its definition: query i of block [a, z) reads every key that a
    kept slash line o crosses in the block's rows (key r - o for some row r of the block), plus the
    kept vertical keys; causally."""
    b, h = verticals.shape[:2]
    offset = tk - tq
    allowed = torch.zeros(b, h, tq, tk, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for i in range(tq):
                rows = [r for r in range(tq) if _block_of(r, size, tq) == _block_of(i, size, tq)]
                crossed = {offset + r - o for r in rows for o in slashes[bi, hi].tolist()}
                for j in range(offset + i + 1):
                    allowed[bi, hi, i, j] = j in crossed
            allowed[bi, hi, :, verticals[bi, hi]] = True
    return allowed.tril(offset)


def _tiles_mask(tiles, size, tq, tk):
    b, h = tiles.shape[:2]
    allowed = torch.zeros(b, h, tq, tk, dtype=torch.bool)
    for i in range(tq):
        for j in range(tk):
            allowed[:, :, i, j] = tiles[:, :, _block_of(i, size, tq), _tile(j, size, tk)]
    return allowed


@pytest.mark.parametrize("spec, name, params", POSITIONS)
@pytest.mark.parametrize("lengths", [(150, 150), (70, 150)])  # prefill; a later chunk of a prefill
def test_minference_equals_naive_masked_attention(spec, name, params, lengths):
    tq, tk = lengths
    q, k, v, q_pos, k_pos = _inputs(tq, tk)
    segments, table = _method(spec)
    method = MInference(min_length=2, vertical=SINK_KEYS + 6, slash=3, last_q=8, block=16)
    with torch.no_grad():
        got = method.attend(q, k, v, q_pos, k_pos, segments, table, SCALE)
    verticals, slashes = method.estimate(q, k, q_pos, k_pos, None, segments, table, SCALE)
    allowed = _vertical_slash_mask(verticals, slashes, 16, tq, tk)
    causal = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
    assert 0.1 < allowed[:, :, causal].float().mean() < 0.8  # really sparse, yet not trivial
    want = _naive_attention(q, k, v, name, params, q_pos, k_pos, allowed)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("spec, name, params", POSITIONS)
@pytest.mark.parametrize("lengths", [(160, 160), (150, 150), (70, 150)])
def test_xattention_equals_naive_masked_attention(spec, name, params, lengths):
    tq, tk = lengths
    q, k, v, q_pos, k_pos = _inputs(tq, tk)
    segments, table = _method(spec)
    method = XAttention(min_length=2, threshold=0.6, stride=4, block=16)
    with torch.no_grad():
        got = method.attend(q, k, v, q_pos, k_pos, segments, table, SCALE)
    tiles = method.select(q, k, q_pos, k_pos, None, segments, table, SCALE).tiles
    allowed = _tiles_mask(tiles, 16, tq, tk)
    want = _naive_attention(q, k, v, name, params, q_pos, k_pos, allowed)
    causal = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
    assert allowed[:, :, causal].float().mean() < 0.9  # some visible tiles dropped
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_padding_keys_are_never_read():
    tq = tk = 96
    q, k, v, q_pos, k_pos = _inputs(tq, tk)
    key_valid = torch.ones(2, tk, dtype=torch.bool)
    key_valid[1, :20] = False  # a left-padded row
    segments, table = _method("none")
    method = XAttention(min_length=2, threshold=0.7, stride=4, block=16)
    with torch.no_grad():
        got = method.attend(q, k, v, q_pos, k_pos, segments, table, SCALE, key_valid)
    tiles = method.select(q, k, q_pos, k_pos, key_valid, segments, table, SCALE).tiles
    allowed = _tiles_mask(tiles, 16, tq, tk) & key_valid[:, None, None, :]
    want = _naive_attention(q, k, v, "none", {}, q_pos, k_pos, allowed)
    torch.testing.assert_close(got[0], want[0], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got[1, :, 20:], want[1, :, 20:], atol=1e-10, rtol=1e-10)


# -- identity settings ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [p[0] for p in POSITIONS])
def test_identity_settings_are_the_dense_kernel(spec):
    q, k, v, q_pos, k_pos = _inputs(130, 130)
    segments, table = _method(spec)
    dense = segmented_attention(q, k, v, q_pos, k_pos, segments, table, SCALE)
    for method in (MInference(min_length=2, vertical=130), XAttention(min_length=2, threshold=1.0)):
        assert torch.equal(method.attend(q, k, v, q_pos, k_pos, segments, table, SCALE), dense)
    # the sparse path itself with every key selected (every slash offset) equals dense attention
    with torch.no_grad():
        every = MInference(min_length=2, vertical=1, slash=130, block=16).attend(
            q, k, v, q_pos, k_pos, segments, table, SCALE
        )
    torch.testing.assert_close(every, dense, atol=1e-12, rtol=1e-12)


# -- through models ------------------------------------------------------------------------------


def _count_sparse_calls(monkeypatch) -> list[int]:
    calls = []
    real = sparse_module.sparse_attention

    def spy(q, *args, **kwargs):
        calls.append(q.shape[2])
        return real(q, *args, **kwargs)

    monkeypatch.setattr("longlab.prefill.base.sparse_attention", spy)
    return calls


def test_bundled_model_at_identity_settings_gives_dense_logits(monkeypatch):
    model, tokenizer = longlab.load("tiny")
    ids = tokenizer("The grass is green. The sky is blue. " * 30, return_tensors="pt").input_ids[:, :400]
    with torch.no_grad():
        dense = longlab.apply(model, "selfextend:group=4,window=128")(ids).logits
        calls = _count_sparse_calls(monkeypatch)
        every = longlab.apply(model, "selfextend:group=4,window=128+minference:min_length=64,vertical=1,slash=400")
        identity = every(ids).logits
        sparse = longlab.apply(model, "selfextend:group=4,window=128+xattention:min_length=64,threshold=0.5,block=32")
        approximate = sparse(ids).logits
    assert calls == [400] * 12  # both sparse runs went through the sparse path, every layer
    torch.testing.assert_close(identity.float(), dense.float(), atol=2e-2, rtol=1e-2)
    assert (approximate.float() - dense.float()).abs().max() > 1e-3  # a real approximation, not dense


def test_generation_with_position_and_cache_methods_composed(monkeypatch):
    """``yarn+minference+snapkv``: the prompt takes the sparse path, every decoding step the dense one."""
    model = build()
    calls = _count_sparse_calls(monkeypatch)
    longlab.apply(model, "yarn:factor=4+minference:min_length=32,vertical=32,slash=8,block=16+snapkv:budget=24")
    ids = torch.randint(3, 128, (2, 120))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape == (2, 126)
    assert calls == [120, 120]  # two layers, prefill only
    kept = [t for layer in longlab.cache_stats(model).layers for row in layer.tokens for t in row]
    assert max(kept) <= 24 + 6  # snapkv still evicts after the sparse prefill


# -- errors and devices ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, message",
    [
        ("minference:vertical=0", r"minference: parameter 'vertical' must be an integer >= 1 and <= 2147483647, got 0"),
        ("minference:slash=-3", r"minference: parameter 'slash' must be an integer >= 1 and <= 2147483647, got -3"),
        (
            "minference:min_length=1",
            r"minference: parameter 'min_length' must be an integer >= 2 and <= 2147483647, got 1",
        ),
        ("xattention:threshold=1.5", r"xattention: parameter 'threshold' must be a number > 0 and <= 1, got 1.5"),
        ("xattention:threshold=0", r"parameter 'threshold' must be a number > 0 and <= 1, got 0.0"),
        ("xattention:block=100", r"parameter 'block' must be a multiple of 'stride' \(8\), got 100"),
        ("minference+xattention", r"two prefill methods"),
    ],
)
def test_bad_parameters_are_clear_errors(spec, message):
    with pytest.raises(SpecError, match=message):
        parse(spec)


def test_gradients_are_refused_with_advice():
    q, k, v, q_pos, k_pos = _inputs(64, 64)
    q.requires_grad_(True)
    segments, table = _method("none")
    with pytest.raises(LonglabError, match=r"no backward pass.*torch.no_grad"):
        MInference(min_length=2, vertical=8, slash=8, block=16).attend(q, k, v, q_pos, k_pos, segments, table, SCALE)


@pytest.mark.parametrize("method", [MInference(min_length=2, vertical=8, slash=8, block=16),
                                    XAttention(min_length=2, threshold=0.5, stride=4, block=16)])  # fmt: skip
def test_no_tensor_is_created_off_the_inputs_device(strict_device, method):
    q, k, v, q_pos, k_pos = _inputs(100, 100)
    key_valid = torch.ones(2, 100, dtype=torch.bool)
    key_valid[0, :5] = False
    segments, table = _method("selfextend:group=4,window=24")
    with strict_device(), torch.no_grad():
        out = method.attend(q, k, v, q_pos, k_pos, segments, table, SCALE, key_valid)
    assert out.device.type == "cpu" and torch.isfinite(out).all()
