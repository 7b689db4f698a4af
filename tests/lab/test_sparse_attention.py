"""Sparse-pattern attentions against dense softmax attention masked with each paper's pattern, the mask
written plainly here pair by pair (float64, lengths spanning several blocks and not multiples of
them); LongNet against its eq. 9 (per-pair softmaxes mixed by their denominators); identity settings
against full causal attention; BigBird's random blocks; bounded pattern size; errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from longlab.errors import SpecError
from longlab.lab.components import component, model_spec
from longlab.lab.model import SIZES, LabModel
from longlab.lab.positions.base import ModelShape
from support.lab import train_steps

HEADS = 4
SHAPE = ModelShape(d_model=16, heads=HEADS, head_dim=4, train_length=8, layers=2)
T = 45


def _inputs(t=T, dtype=torch.float64):
    torch.manual_seed(0)
    return tuple(torch.randn(2, HEADS, t, 8, dtype=dtype, requires_grad=True) for _ in range(3))


def masked_softmax(q, k, v, mask):
    """Dense attention with mask (H, T, T) of allowed (query, key) pairs."""
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~mask, -math.inf)
    return torch.softmax(scores, -1) @ v


def mask_of(rule, t=T, heads=HEADS):
    """(heads, t, t) bool: rule(h, i, j) for every causal pair j <= i, False above the diagonal."""
    mask = torch.zeros(heads, t, t, dtype=torch.bool)
    for h in range(heads):
        for i in range(t):
            for j in range(i + 1):
                mask[h, i, j] = bool(rule(h, i, j))
    return mask


def _run(spec, q, k, v, layer=0):
    return component(spec).build(SHAPE, layer)(q, k, v, torch.arange(q.shape[2]))


def _check(ours, reference, inputs):
    torch.testing.assert_close(ours, reference)
    grad = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(reference, inputs, grad), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("window", "dilation", "dilated_heads"), [(5, 3, 4), (4, 2, 2), (7, 1, 4), (3, 4, 0)])
def test_dilated_equals_its_masked_softmax(window, dilation, dilated_heads):
    q, k, v = _inputs()

    def rule(h, i, j):
        d = dilation if h >= HEADS - dilated_heads else 1
        return (i - j) % d == 0 and (i - j) // d < window

    spec = f"dilated:window={window},dilation={dilation},dilated_heads={dilated_heads}"
    _check(_run(spec, q, k, v), masked_softmax(q, k, v, mask_of(rule)), (q, k, v))


@pytest.mark.parametrize(("window", "globals"), [(5, 3), (20, 1), (1, 0), (3, 20)])
def test_longformer_equals_its_masked_softmax(window, globals):
    q, k, v = _inputs()
    mask = mask_of(lambda h, i, j: i - j < window or j < globals)
    _check(_run(f"longformer:window={window},globals={globals}", q, k, v), masked_softmax(q, k, v, mask), (q, k, v))


@pytest.mark.parametrize(("block", "window", "globals", "randoms"), [(4, 2, 1, 2), (3, 3, 2, 1), (5, 1, 0, 3)])
def test_bigbird_equals_its_masked_softmax(block, window, globals, randoms):
    q, k, v = _inputs()
    spec = f"bigbird:block={block},window_blocks={window},global_blocks={globals},random_blocks={randoms},seed=7"
    module = component(spec).build(SHAPE, 1)
    drawn = module.random(-(-T // block), torch.device("cpu"))  # (H, n, randoms): checked below on its own

    def rule(h, i, j):
        bi, bj = i // block, j // block
        return bi - window < bj or bj < globals or bj in drawn[h, bi].tolist()

    _check(module(q, k, v, torch.arange(T)), masked_softmax(q, k, v, mask_of(rule)), (q, k, v))


@pytest.mark.parametrize(("block", "shifted"), [(4, 2), (7, 4), (10, 0)])
def test_blockwise_equals_its_masked_softmax(block, shifted):
    q, k, v = _inputs()

    def rule(h, i, j):
        bi, bj = i // block, j // block
        if h >= HEADS - shifted and bi > 0:
            return bj == bi - 1  # the previous block, whole
        return bj == bi  # the own block, causally

    _check(
        _run(f"blockwise:block={block},shifted_heads={shifted}", q, k, v),
        masked_softmax(q, k, v, mask_of(rule)),
        (q, k, v),
    )


def longnet_reference(q, k, v, pairs):
    """Ding et al. 2023, eq. 5-9 written plainly: per (w, r) and head h, the rows (i mod w) = h mod r
    (mod r) of each segment attend causally to the same rows of their segment (output O_p, softmax
    denominator s_p; rows not kept: O_p = 0, s_p = 0); O = sum_p s_p O_p / sum_p s_p."""
    t = q.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    outputs, denominators = [], []
    for w, r in pairs:
        mask = mask_of(lambda h, i, j: i // w == j // w and (i % w) % r == h % r and (j % w) % r == h % r, t)  # noqa: B023
        weights = torch.exp(scores) * mask
        s = weights.sum(-1, keepdim=True)
        outputs.append(torch.where(s > 0, (weights @ v) / torch.where(s > 0, s, 1), 0.0))
        denominators.append(s)
    total = sum(denominators)
    return sum(s * o for s, o in zip(denominators, outputs, strict=True)) / total


@pytest.mark.parametrize("pairs", [((8, 1), (16, 2), (32, 4)), ((6, 1), (12, 3)), ((100, 2), (10, 1)), ((5, 1),)])
def test_longnet_equals_its_equation(pairs):
    q, k, v = _inputs()
    segments = ";".join(str(w) for w, _ in pairs)
    dilations = ";".join(str(r) for _, r in pairs)
    ours = _run(f"longnet:segments=[{segments}],dilations=[{dilations}]", q, k, v)
    _check(ours, longnet_reference(q, k, v, pairs), (q, k, v))


def test_longnet_rows_no_pair_keeps_output_zero():
    q, k, v = (x.detach() for x in _inputs())
    out = _run("longnet:segments=[8],dilations=[2]", q, k, v)
    assert out[:, 0, 1::2].abs().max() == 0  # head 0 keeps the even rows only
    assert out[:, 0, 0::2].abs().min() > 0


FULL_SETTINGS = [
    "dilated:window=45,dilation=1",
    "dilated:window=45,dilation=3,dilated_heads=0",
    "longformer:window=45,globals=0",
    "longformer:window=45,globals=45",
    "bigbird:block=4,window_blocks=12,global_blocks=0,random_blocks=0",
    "bigbird:block=4,window_blocks=1,global_blocks=12",
    "longnet:segments=[64],dilations=[1]",
    "blockwise:block=64,shifted_heads=4",
]


@pytest.mark.parametrize("spec", FULL_SETTINGS)
def test_identity_settings_are_full_causal_attention(spec):
    q, k, v = _inputs(dtype=torch.float32)
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(_run(spec, q, k, v), full, atol=1e-5, rtol=1e-5)


def test_dilation_one_is_the_sliding_window():
    q, k, v = _inputs()
    torch.testing.assert_close(_run("dilated:window=6,dilation=1", q, k, v), _run("sliding:window=6", q, k, v))


def test_bigbird_random_blocks():
    spec = component("bigbird:block=4,window_blocks=2,global_blocks=1,random_blocks=3,seed=3")
    module = spec.build(SHAPE, 0)
    long = module.random(512, torch.device("cpu"))
    assert torch.equal(spec.build(SHAPE, 0).random(512, torch.device("cpu")), long)  # deterministic
    assert torch.equal(module.random(32, torch.device("cpu")), long[:, :32])  # training's blocks keep theirs
    for h in range(HEADS):
        for n in range(512):
            picked = [b for b in long[h, n].tolist() if b >= 0]
            eligible = list(range(1, n - 2 + 1))  # not global (block 0), not in the window (n - 1, n)
            assert len(picked) == min(3, len(eligible)) and len(set(picked)) == len(picked)
            assert set(picked) <= set(eligible)
    other_layer = spec.build(SHAPE, 1).random(512, torch.device("cpu"))
    other_seed = component("bigbird:block=4,window_blocks=2,global_blocks=1,random_blocks=3,seed=4").build(SHAPE, 0)
    assert not torch.equal(other_layer, long) and not torch.equal(other_seed.random(512, torch.device("cpu")), long)
    assert not torch.equal(long[0], long[1])  # heads differ
    # uniform over the eligible blocks: where a draw falls in its range 1 .. n - 2, in tenths
    n = torch.arange(512).view(1, -1, 1).expand_as(long)
    drawn = long[n >= 40]
    where = (drawn - 1).double() / (n[n >= 40] - 2).double()
    tenths = torch.bincount((where * 10).long(), minlength=10).double()
    assert ((tenths / tenths.mean() - 1).abs() < 0.2).all()


DEFAULTS = ["dilated", "longformer", "bigbird", "longnet", "blockwise"]


@pytest.mark.parametrize("spec", DEFAULTS)
def test_patterns_stay_small_at_2048(spec):
    """O(T x allowed), never T x T: every pattern lists at most a few hundred keys per query."""
    module = component(spec).build(SHAPE, 0)
    index, allowed = module.pattern(2048, torch.device("cpu"))
    assert index.shape[-1] <= 160 and allowed.numel() <= HEADS * 2048 * 160
    assert allowed.sum(-1).max() <= 128  # keys actually attended by one query


@pytest.mark.parametrize("spec", DEFAULTS)
def test_device_generic_on_meta(spec):
    q, k, v = (torch.empty(1, HEADS, 70, 8, device="meta") for _ in range(3))
    out = component(spec).build(SHAPE, 0)(q, k, v, torch.arange(70, device="meta"))
    assert out.shape == (1, HEADS, 70, 8) and out.device.type == "meta"


@pytest.mark.parametrize("spec", DEFAULTS)
def test_the_model_trains_with_each_pattern(spec):
    torch.manual_seed(0)
    position, attention = model_spec(f"rope+{spec}")
    model = LabModel(50, SIZES["tiny"], position, train_length=16, attention=attention)
    ids = torch.randint(0, 50, (2, 40))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

    def finite_gradients(model):
        assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())

    losses = train_steps(model, ids, optimizer, 5, finite_gradients)
    assert all(math.isfinite(x) for x in losses) and model.loss(ids).item() < losses[0]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("rope+dilated:window=0", "'window' must be an integer >= 1"),
        ("rope+dilated:dilation=1.5", "'dilation' must be an integer"),
        ("rope+longformer:globals=-1", "'globals' must be an integer >= 0"),
        ("rope+bigbird:seed=-2", "'seed' must be an integer >= 0"),
        ("rope+bigbird:window_blocks=0", "'window_blocks' must be an integer >= 1"),
        ("rope+blockwise:block=0", "'block' must be an integer >= 1"),
        ("rope+longnet:segments=[8;16],dilations=[1]", "same length"),
        ("rope+longnet:segments=[10],dilations=[4]", "multiple of its dilation"),
        ("rope+longnet:segments=[8.5],dilations=[1]", "whole numbers"),
        ("rope+longnet:segments=[0],dilations=[1]", "'segments' must be a finite number >= 1"),
        ("rope+longnet:segments=[],dilations=[]", "non-empty list"),
    ],
)
def test_bad_parameters_are_refused(spec, message):
    with pytest.raises(SpecError, match=message):
        model_spec(spec)


@pytest.mark.parametrize(
    ("spec", "message"), [("dilated:dilated_heads=5", "dilated_heads"), ("blockwise:shifted_heads=9", "shifted_heads")]
)
def test_head_counts_beyond_the_model_are_refused(spec, message):
    with pytest.raises(SpecError, match=f"'{message}' must be an integer >= 0 and <= the model's 4 heads"):
        component(spec).build(SHAPE, 0)


@pytest.mark.parametrize("spec", DEFAULTS)
def test_the_model_runs_under_strict_devices(strict_device, spec):
    """A tensor made without its inputs' device lands on meta here and meets the CPU data: an error."""
    ids = torch.randint(0, 50, (1, 70), device="cpu")
    position, attention = model_spec(f"rope+{spec}")
    model = LabModel(50, SIZES["tiny"], position, train_length=16, attention=attention)
    with strict_device():
        loss = model.loss(ids, torch.arange(70, device="cpu"))
    assert torch.isfinite(loss)
