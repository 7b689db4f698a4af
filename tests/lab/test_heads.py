"""GQA/MQA, cross-layer KV sharing (CLA) and differential attention against their papers' equations
written plainly (O(L^2), float64), output and gradients; identity settings; the KV cache figure."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from longlab.errors import SpecError
from longlab.lab.components import component, model_spec
from longlab.lab.kv_bytes import kv_bytes_per_token
from longlab.lab.model import SIZES, LabModel, Size
from longlab.lab.positions.base import ModelShape
from longlab.lab.report import write_report
from support.lab import train_steps

SHAPE = ModelShape(d_model=48, heads=6, head_dim=8, train_length=8, layers=2)


def causal_softmax(q, k):
    """softmax(q k^T / sqrt d) over keys j <= i, the full T x T matrix."""
    t = q.shape[-2]
    allowed = torch.ones(t, t, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~allowed, -math.inf)
    return torch.softmax(scores, -1)


def naive_grouped(q, k, v):
    """GQA (Ainslie et al., 2023, §2.2): query head h uses K/V head h // (H / G), the K/V heads repeated."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return causal_softmax(q, k) @ v


def _tensors(*shapes, dtype=torch.float64):
    return tuple(torch.randn(*s, dtype=dtype, requires_grad=True) for s in shapes)


def _check(ours, reference, inputs):
    torch.testing.assert_close(ours, reference)
    grad = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(reference, inputs, grad), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("spec", "kv_heads"), [("gqa:kv_heads=2", 2), ("gqa:kv_heads=3", 3), ("mqa", 1)])
def test_grouped_attention_equals_repeated_kv_heads(spec, kv_heads):
    q, k, v = _tensors((2, 6, 19, 8), (2, kv_heads, 19, 8), (2, kv_heads, 19, 8))
    module = component(spec).build(SHAPE, 0)
    assert module.kv_heads == kv_heads
    _check(module(q, k, v, torch.arange(19)), naive_grouped(q, k, v), (q, k, v))


def _model(spec: str, size: Size = SIZES["tiny"], seed: int = 0) -> LabModel:
    torch.manual_seed(seed)
    position, attention = model_spec(spec)
    return LabModel(50, size, position, train_length=16, attention=attention)


def _same_model(a: LabModel, b: LabModel, ids: torch.Tensor) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[n], sb[n]) for n in sa)  # same weights, same seed
    torch.testing.assert_close(a.loss(ids), b.loss(ids))


IDS = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize(
    ("spec", "plain"),
    [
        ("rope+gqa:kv_heads=4", "rope"),  # as many K/V heads as query heads: multi-head attention
        ("rope+cla:share=1", "rope"),  # groups of one layer: nothing shared
        ("rope+cla:share=1,kv_heads=2", "rope+gqa:kv_heads=2"),
        ("rope+cla:share=1,kv_heads=1", "rope+mqa"),
        ("rope+mqa", "rope+gqa:kv_heads=1"),
    ],
)
def test_identity_settings_are_the_plain_model(spec, plain):
    _same_model(_model(spec), _model(plain), IDS)


def test_fewer_kv_heads_change_the_model():
    assert not torch.allclose(_model("rope+gqa:kv_heads=2").loss(IDS), _model("rope").loss(IDS))


def rope_plain(x, positions, base=10000.0):
    """RoPE (Su et al., 2021, eq. 34): channel pair (i, i + d/2) turned by p * base^(-2i/d), as complex numbers."""
    half = x.shape[-1] // 2
    angle = positions.double()[:, None] * base ** (-2 * torch.arange(half, dtype=torch.float64) / x.shape[-1])
    turned = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat((turned.real, turned.imag), dim=-1)


def rms(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def naive_cla_hidden(model: LabModel, ids: torch.Tensor, share: int, kv_heads: int) -> torch.Tensor:
    """The decoder written out layer by layer (Brandon et al., 2024, §2): layer l attends with the K/V
    projected by layer share * floor(l / share) from that layer's own input; the others project q only."""
    size_heads, d = model.model.blocks[0].attention.heads, model.model.blocks[0].attention.head_dim
    b, t = ids.shape
    positions = torch.arange(t)
    x = model.model.embed.weight[ids]
    kv = {}
    for layer, block in enumerate(model.model.blocks):
        h = rms(x, block.norm1.weight, block.norm1.eps or torch.finfo(x.dtype).eps)
        w = block.attention.qkv.weight
        q = (h @ w[: size_heads * d].T).view(b, t, size_heads, d).transpose(1, 2)
        if layer % share == 0:
            rest = h @ w[size_heads * d :].T
            k = rest[..., : kv_heads * d].reshape(b, t, kv_heads, d).transpose(1, 2)
            v = rest[..., kv_heads * d :].reshape(b, t, kv_heads, d).transpose(1, 2)
            kv[layer] = (rope_plain(k, positions), v)
        k, v = kv[share * (layer // share)]
        y = naive_grouped(rope_plain(q, positions), k, v)
        x = x + y.transpose(1, 2).reshape(b, t, -1) @ block.attention.out.weight.T
        h = rms(x, block.norm2.weight, block.norm2.eps or torch.finfo(x.dtype).eps)
        gate, up = (h @ block.up.weight.T).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ block.down.weight.T
    return rms(x, model.model.norm.weight, model.model.norm.eps or torch.finfo(x.dtype).eps)


@pytest.mark.parametrize(("share", "kv_heads", "layers"), [(2, None, 2), (2, 2, 2), (2, 1, 4), (3, None, 4), (1, 2, 2)])
def test_cla_equals_a_model_that_reuses_the_first_layers_kv(share, kv_heads, layers):
    size = Size(d_model=32, layers=layers, heads=4, mlp=48)
    spec = f"rope+cla:share={share}" + (f",kv_heads={kv_heads}" if kv_heads else "")
    model = _model(spec, size).double()
    ids = IDS[:, :24]
    ours = model.model(ids).last_hidden_state
    reference = naive_cla_hidden(model, ids, share, kv_heads or 4)
    close = {"atol": 1e-5, "rtol": 1e-5}  # the model's RoPE table is float32 (angles to ~1e-7), ours float64
    torch.testing.assert_close(ours, reference, **close)
    params, grad = list(model.parameters()), torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, params, grad), torch.autograd.grad(reference, params, grad), strict=True):
        torch.testing.assert_close(a, b, **close)
    # only a group's first layer owns K/V weights: the others project queries alone
    rows = [block.attention.qkv.weight.shape[0] for block in model.model.blocks]
    assert rows == [32 + (2 * (kv_heads or 4) * 8 if layer % share == 0 else 0) for layer in range(layers)]


def naive_differential(q, k, v, lq1, lk1, lq2, lk2, lambda_init, weight, eps=1e-5):
    """Ye et al., 2024, §2.1, eq. 1-3, per differential head i (query/key heads 2i, 2i+1; value 2d)."""
    lam = torch.exp(torch.dot(lq1, lk1)) - torch.exp(torch.dot(lq2, lk2)) + lambda_init
    heads = []
    for i in range(q.shape[1] // 2):
        value = torch.cat((v[:, 2 * i], v[:, 2 * i + 1]), dim=-1)
        a1, a2 = causal_softmax(q[:, 2 * i], k[:, 2 * i]), causal_softmax(q[:, 2 * i + 1], k[:, 2 * i + 1])
        head = (a1 - lam * a2) @ value
        heads.append((1 - lambda_init) * rms(head, weight, eps))
    return torch.stack(heads, dim=1)


def _differential(lambda_init=None, layer=0):
    module = component("differential" + ("" if lambda_init is None else f":lambda_init={lambda_init}"))
    module = module.build(SHAPE, layer).double()
    with torch.no_grad():  # a non-trivial norm weight, so its gradient is checked too
        module.norm.weight.copy_(torch.rand(2 * SHAPE.head_dim, dtype=torch.float64) + 0.5)
    return module


@pytest.mark.parametrize("lambda_init", [None, 0.5])
def test_differential_equals_its_equations(lambda_init):
    module = _differential(lambda_init, layer=1)
    q, k, v = _tensors((2, 6, 17, 8), (2, 6, 17, 8), (2, 6, 17, 8))
    params = (module.lambda_q1, module.lambda_k1, module.lambda_q2, module.lambda_k2, module.norm.weight)
    init = 0.8 - 0.6 * math.exp(-0.3 * (2 - 1)) if lambda_init is None else lambda_init  # layer l = 2
    reference = naive_differential(q, k, v, *params[:4], init, params[4])
    ours = module(q, k, v, torch.arange(17))
    assert ours.shape == (2, 3, 17, 16)  # heads halved, each of 2d channels
    _check(ours, reference, (q, k, v, *params))


def test_differential_with_lambda_zero_is_attention_of_the_first_map_then_the_norm():
    """lambda_init = 0 and lq2 = lq1, lk2 = lk1 make lambda = 0: the second map drops out, leaving plain
    softmax attention with half the heads (q, k of d, v of 2d), then the per-head RMSNorm, scale 1."""
    module = _differential(lambda_init=0.0)
    with torch.no_grad():
        module.lambda_q2.copy_(module.lambda_q1)
        module.lambda_k2.copy_(module.lambda_k1)
    q, k, v = _tensors((1, 6, 15, 8), (1, 6, 15, 8), (1, 6, 15, 8))
    value = torch.cat((v[:, 0::2], v[:, 1::2]), dim=-1)
    plain = rms(causal_softmax(q[:, 0::2], k[:, 0::2]) @ value, module.norm.weight, 1e-5)
    ours = module(q, k, v, torch.arange(15))
    torch.testing.assert_close(ours, plain)
    other = q.detach().clone()
    other[:, 1::2] = torch.randn_like(other[:, 1::2])  # any Q2 (odd query heads): the same output
    torch.testing.assert_close(module(other, k, v, torch.arange(15)), ours)


def test_differential_lambda_init_follows_the_layer():
    model = _model("rope+differential", Size(d_model=32, layers=3, heads=4, mlp=48))
    inits = [block.attention.attend.lambda_init for block in model.model.blocks]
    assert inits == pytest.approx([0.2, 0.8 - 0.6 * math.exp(-0.3), 0.8 - 0.6 * math.exp(-0.6)])
    # its lambdas come from a forked random stream: the weights every model shares stay the same
    plain = _model("rope", Size(d_model=32, layers=3, heads=4, mlp=48)).state_dict()
    assert all(torch.equal(plain[n], w) for n, w in model.state_dict().items() if n in plain)


@pytest.mark.parametrize(
    "spec", ["rope+gqa:kv_heads=2", "rope+mqa", "rope+cla", "rope+cla:kv_heads=1", "rope+differential"]
)
def test_the_model_trains(spec):
    model = _model(spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = IDS[:, :32]
    first = model.loss(ids)

    def every_weight_learns(model):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())

    train_steps(model, ids, optimizer, 15, every_weight_learns)
    assert model.loss(ids) < first - 0.5


@pytest.mark.parametrize(
    ("spec", "kv_layers", "kv_heads"),
    [
        ("rope", 2, 4),
        ("rope+gqa:kv_heads=2", 2, 2),
        ("rope+mqa", 2, 1),
        ("rope+cla", 1, 4),
        ("rope+cla:kv_heads=1", 1, 1),
        ("rope+differential", 2, 4),  # 2 x (H/2) key maps of d, H/2 values of 2d: multi-head's cache
        ("rope+sliding:window=8", 2, 4),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_bytes_per_token_is_the_formula(spec, kv_layers, kv_heads, dtype):
    model = _model(spec).to(dtype)  # tiny: head_dim 16
    assert kv_bytes_per_token(model) == kv_layers * 2 * kv_heads * 16 * torch.finfo(dtype).bits // 8


def test_linear_attention_has_no_per_token_cache():
    assert kv_bytes_per_token(_model("rope+linear")) is None


def test_the_report_has_a_kv_column(tmp_path):
    train = {"kind": "train", "parameters": 10, "tokens_per_s": 1.0, "peak_memory_mb": 1.0, "final_loss": 1.0}
    rows = [
        {"component": "rope", **train, "kv_bytes_per_token": 1024},
        {"component": "rope+mqa", **train, "kv_bytes_per_token": 256},
        {"component": "rope+linear", **train, "kv_bytes_per_token": None},
        {"component": "old", **train},  # a row written before the column existed
        {"component": "rope", "kind": "ppl", "length": 16, "ppl": 10.0},
    ]
    config = type("C", (), {"preset": "efficient", "size": "tiny", "vocab_size": 1024, "length": 16, "steps": 1})
    config.batch_size, config.seed, config.ppl_windows, config.passkey_samples = 1, 0, 1, 0
    text = write_report(tmp_path, config, rows).read_text()
    assert "KV cache bytes/token |" in text
    assert "| 1.000 | 1,024 |" in text and "| 1.000 | 256 |" in text
    assert text.count("| 1.000 | – |") == 2


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("rope+gqa:kv_heads=0", "'kv_heads' must be an integer >= 1"),
        ("rope+cla:share=0", "'share' must be an integer >= 1"),
        ("rope+differential:lambda_init=1", "'lambda_init' must be a number >= 0 and < 1"),
        ("rope+differential:lambda_init=-0.1", "'lambda_init' must be a number >= 0"),
    ],
)
def test_bad_specs_name_the_parameter(spec, message):
    with pytest.raises(SpecError, match=message):
        model_spec(spec)


@pytest.mark.parametrize("spec", ["rope+gqa:kv_heads=3", "rope+cla:kv_heads=3"])
def test_kv_heads_must_divide_the_heads(spec):
    with pytest.raises(SpecError, match="'kv_heads' must divide the model's 4 query heads, got 3"):
        _model(spec)


def test_differential_needs_pairs_of_heads():
    with pytest.raises(SpecError, match="even number of heads"):
        _model("rope+differential", Size(d_model=24, layers=1, heads=3, mlp=32))


def test_biased_positions_are_refused():
    with pytest.raises(SpecError, match="cannot add alibi's position bias"):
        model_spec("alibi+gqa")


@pytest.mark.parametrize("spec", ["rope+gqa", "rope+mqa", "rope+cla:kv_heads=2", "xpos+differential"])
def test_runs_under_strict_devices(spec, strict_device):
    model = _model(spec)
    with strict_device():
        loss = model.loss(IDS)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("spec", ["gqa:kv_heads=2", "mqa", "differential"])
def test_attention_stays_on_the_fused_kernel(spec):
    """Memory bounded: SDPA's fused CPU kernel (O(T d)), never its math path that builds T x T scores
    (grouped K/V or unequal q/v head sizes can send it there)."""
    module = component(spec).build(SHAPE, 0)
    kv = module.kv_heads or SHAPE.heads
    q, k, v = _tensors((1, 6, 64, 8), (1, kv, 64, 8), (1, kv, 64, 8), dtype=torch.float32)
    with torch.profiler.profile() as profile:
        module(q, k, v, torch.arange(64)).sum().backward()
    ops = {event.key for event in profile.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::_scaled_dot_product_attention_math" not in ops
