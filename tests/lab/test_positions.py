"""Each position component against its paper's equation written plainly (O(L^2) loops), identity
settings against the plain model, validation messages, and gradients reaching learnable parameters."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.t5.modeling_t5 import T5Attention

from longlab.errors import SpecError
from longlab.lab.components import component
from longlab.lab.model import SIZES, LabModel
from longlab.lab.positions.alibi import alibi_slopes
from longlab.lab.positions.base import ModelShape
from longlab.lab.registry import COMPONENTS

SHAPE = ModelShape(d_model=16, heads=4, head_dim=4, train_length=8)
T = 9
POS = torch.arange(T)


def _bias(spec: str, module=None) -> torch.Tensor:
    module = module or component(spec).build(SHAPE)
    return module.bias(module.bias_params(), POS, POS)


def _lower(h: int):
    return [(h, i, j) for h in range(h) for i in range(T) for j in range(i + 1)]


# -- additive biases: the paper's formula per (head, i, j), in plain Python ----------------------------


def test_alibi_slopes_are_the_papers():
    assert alibi_slopes(8) == [2.0**-k for k in range(1, 9)]
    assert alibi_slopes(4) == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]
    # 6 heads: the 4-head slopes, then every other slope of the 8-head set (the paper's code)
    assert alibi_slopes(6) == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]


def test_alibi_is_minus_slope_times_distance():
    bias = _bias("alibi")
    for h, i, j in _lower(4):
        assert bias[h, i, j].item() == pytest.approx(-(2.0 ** (-8 * (h + 1) / 4)) * (i - j))


def test_t5_buckets_equal_transformers():
    dist = torch.arange(0, 3000)
    from longlab.lab.positions.t5 import causal_bucket

    for buckets, max_distance in ((32, 128), (8, 20), (16, 64)):
        expected = T5Attention._relative_position_bucket(
            -dist, bidirectional=False, num_buckets=buckets, max_distance=max_distance
        )
        assert torch.equal(causal_bucket(dist, buckets, max_distance), expected)


def test_t5_bias_reads_the_table():
    module = component("t5:buckets=8,max_distance=16").build(SHAPE)
    with torch.no_grad():
        module.table.copy_(torch.randn_like(module.table))
    bias = _bias("", module)
    for h, i, j in _lower(4):
        d = i - j
        bucket = d if d < 4 else min(7, 4 + int(math.log(d / 4) / math.log(16 / 4) * 4))
        assert bias[h, i, j].item() == module.table[h, bucket].item()


@pytest.mark.parametrize("variant", ["log", "power"])
def test_kerple(variant):
    module = component(f"kerple_{variant}").build(SHAPE)
    with torch.no_grad():
        module.r1.copy_(torch.rand(4, 1, 1) + 0.1)
        module.r2.copy_(torch.rand(4, 1, 1) + 0.1)
    bias = _bias("", module)
    for h, i, j in _lower(4):
        r1, r2, d = module.r1[h].item(), module.r2[h].item(), i - j
        expected = -r1 * math.log(1 + r2 * d) if variant == "log" else -r1 * d**r2
        assert bias[h, i, j].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_sandwich_is_the_inner_product_of_sinusoidal_embeddings():
    dim = 8
    bias = _bias(f"sandwich:dim={dim}")

    def p(n):  # the sinusoidal embedding of position n at frequencies 1/10000^(2k/d'), k = 1..d'/2
        freqs = [10000 ** (-2 * k / dim) for k in range(1, dim // 2 + 1)]
        return [f(n * w) for w in freqs for f in (math.sin, math.cos)]

    for h, i, j in _lower(4):
        inner = sum(a * b for a, b in zip(p(i), p(j), strict=True))
        assert bias[h, i, j].item() == pytest.approx((inner - dim / 2) / (8 * (h + 1) / 4), abs=1e-5)


def test_fire_is_an_mlp_of_the_normalised_log_distance():
    module = component("fire:hidden=5,threshold=4").build(SHAPE)
    bias = _bias("", module)
    w1, b1, w2, b2 = (t.detach().tolist() for t in (module.w1, module.b1, module.w2, module.b2))
    c, threshold = module.c.item(), module.threshold.item()
    for h, i, j in _lower(4):
        x = math.log(c * (i - j) + 1) / math.log(c * max(threshold, i) + 1)
        hidden = [max(0.0, w1[u][0] * x + b1[u]) for u in range(5)]
        assert bias[h, i, j].item() == pytest.approx(sum(w2[h][u] * hidden[u] for u in range(5)) + b2[h], abs=1e-5)


# -- rotations and absolute embeddings ------------------------------------------------------------------


def _pairs(x):
    """Channel pairs (i, i + d/2) of a vector as complex numbers."""
    half = len(x) // 2
    return [complex(x[i], x[i + half]) for i in range(half)]


@pytest.mark.parametrize("spec", ["rope", "xpos"])
def test_rotary_logits_are_the_complex_product(spec):
    """RoPE: q_n . k_m = Re sum_i q_i conj(k_i) e^{i (n-m) theta_i}; xPos also scales pair i by
    zeta_i^((n-m)/B) (Sun et al., 2023, eq. 10)."""
    module = component(spec).build(SHAPE)
    q, k = torch.randn(1, 1, T, 4, dtype=torch.float64), torch.randn(1, 1, T, 4, dtype=torch.float64)
    logits = module.rotate(q, POS, key=False)[0, 0] @ module.rotate(k, POS, key=True)[0, 0].T
    theta = [10000 ** (-2 * i / 4) for i in range(2)]
    zeta = [(2 * i / 4 + 0.4) / 1.4 for i in range(2)] if spec == "xpos" else [1.0, 1.0]
    for n in range(T):
        for m in range(T):
            qn, km = _pairs(q[0, 0, n].tolist()), _pairs(k[0, 0, m].tolist())
            expected = sum(
                (qn[i] * km[i].conjugate() * complex(math.cos((n - m) * theta[i]), math.sin((n - m) * theta[i]))).real
                * zeta[i] ** ((n - m) / 512)
                for i in range(2)
            )
            assert logits[n, m].item() == pytest.approx(expected, abs=1e-6)  # float32 angles, as transformers


def test_sinusoidal_is_vaswani():
    pe = component("sinusoidal").build(SHAPE).absolute(POS)
    for p in range(T):
        for i in range(16 // 2):
            assert pe[p, 2 * i].item() == pytest.approx(math.sin(p / 10000 ** (2 * i / 16)), abs=1e-6)
            assert pe[p, 2 * i + 1].item() == pytest.approx(math.cos(p / 10000 ** (2 * i / 16)), abs=1e-6)


def test_learned_rows_and_its_limit():
    module = component("learned:max_positions=12").build(SHAPE)
    assert torch.equal(module.absolute(POS), module.table.weight[:T])
    with pytest.raises(Exception, match="max_positions"):
        module.absolute(torch.arange(13))


def test_randomized_positions_are_sorted_distinct_and_seeded():
    module = component("randomized:max_position=64").build(SHAPE)
    draw = module.positions(16, torch.device("cpu"), torch.Generator().manual_seed(3))
    again = module.positions(16, torch.device("cpu"), torch.Generator().manual_seed(3))
    assert torch.equal(draw, again) and len(set(draw.tolist())) == 16
    assert bool((draw[1:] > draw[:-1]).all()) and int(draw.min()) >= 0 and int(draw.max()) < 64
    assert torch.equal(module.positions(16, torch.device("cpu")), torch.arange(16))  # evaluation


# -- identity settings: the component at its neutral setting is the plain model ------------------------


def _loss(spec, ids, positions=None, edit=None):
    model = LabModel(50, SIZES["tiny"], component(spec), train_length=16).double()
    if edit:
        with torch.no_grad():
            edit(model.model.position)
    return model.loss(ids, positions)


def _zero(*names):
    def edit(module):
        for name in names:
            getattr(module, name).zero_()

    return edit


IDENTITIES = [
    ("alibi:scale=0", None),
    ("kerple_log:r1=0", None),
    ("kerple_power:r1=0", None),
    ("t5", None),  # the bucket table starts at zero
    ("fire", _zero("w2", "b2")),  # a zero MLP output layer
    ("learned", lambda m: m.table.weight.zero_()),
]


@pytest.mark.parametrize(("spec", "edit"), IDENTITIES)
def test_neutral_settings_equal_nope(spec, edit):
    torch.manual_seed(1)
    ids = torch.randint(0, 50, (2, 40))
    torch.manual_seed(0)
    nope = _loss("nope", ids)
    torch.manual_seed(0)
    torch.testing.assert_close(_loss(spec, ids, edit=edit), nope)


def test_randomized_over_its_own_length_is_rope():
    ids = torch.randint(0, 50, (2, 16))
    module = component("randomized:max_position=16").build(SHAPE)
    positions = module.positions(16, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert torch.equal(positions, torch.arange(16))
    torch.manual_seed(0)
    rope = _loss("rope", ids)
    torch.manual_seed(0)
    torch.testing.assert_close(_loss("randomized:max_position=16", ids, positions), rope)


def test_a_real_bias_changes_the_model():
    """The identity tests above can fail: a non-neutral setting gives another loss."""
    ids = torch.randint(0, 50, (2, 40))
    torch.manual_seed(0)
    nope = _loss("nope", ids)
    torch.manual_seed(0)
    assert not torch.allclose(_loss("alibi", ids), nope)


# -- learnable parameters learn; bad values are refused ----------------------------------------------


@pytest.mark.parametrize("spec", ["fire", "t5", "kerple_log", "kerple_power", "learned"])
def test_gradients_reach_the_components_parameters(spec):
    model = LabModel(50, SIZES["tiny"], component(spec), train_length=16)
    if spec == "t5":
        with torch.no_grad():
            model.model.position.table.normal_()
    model.loss(torch.randint(0, 50, (2, 40))).backward()
    grads = [p.grad for p in model.model.position.parameters()]
    assert grads and all(g is not None and bool(g.abs().sum() > 0) for g in grads)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("alibi:scale=-1", "'scale' must be a finite number >= 0, got -1.0"),
        ("kerple_power:r2=3", "'r2' must be a number > 0 and <= 2, got 3.0"),
        ("fire:hidden=0", "'hidden' must be an integer >= 1"),
        ("t5:buckets=64,max_distance=16", "'buckets // 2' must be < 'max_distance'"),
        ("alibbi", "did you mean 'alibi'"),
        ("rope:bse=2", "no parameter 'bse'"),
    ],
)
def test_bad_specs_name_the_parameter(spec, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(")):
        component(spec)


def test_every_component_runs_a_model_under_strict_devices(strict_device):
    ids = torch.randint(0, 50, (1, 20), device="cpu")
    for name in [n for n, cls in COMPONENTS.items() if cls.kind == "lab-position"]:
        model = LabModel(50, SIZES["tiny"], component(name), train_length=8)
        with strict_device():
            loss = model.loss(ids, model.model.position.positions(20, ids.device, torch.Generator().manual_seed(0)))
        assert torch.isfinite(loss)
