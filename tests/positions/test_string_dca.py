"""STRING and Dual Chunk Attention: defaults, validation, identity settings, the plan's chunk bounds,
a patched model against a hand-built forward from the papers' equations, and cache composition."""

from __future__ import annotations

import math

import pytest
import torch

import longlab
from longlab import parse
from longlab.attention.kernel import plan, segmented_attention
from longlab.attention.plan import CAUSAL, FULL, MASK, classify
from longlab.cache.scores import attention_mass
from longlab.cli import main
from longlab.parallel.stats import count_pairs
from longlab.positions.rope import RopeConfig
from support import reference
from support.models import L_TRAIN, build

HEAD_DIM = 16
ROPE = RopeConfig(HEAD_DIM, 10000.0, 64, reference.inv_freq(HEAD_DIM))


def _rope(length: int) -> RopeConfig:
    return RopeConfig(HEAD_DIM, 10000.0, length, reference.inv_freq(HEAD_DIM))


# -- defaults and validation ----------------------------------------------------------------------


def test_string_defaults_follow_the_official_code():
    method = parse("string")[0].resolve(_rope(131072))
    assert (method.shift, method.window) == (43253, 128)  # int(0.33 L), the README's value for Llama 3.1
    assert method.reach() == 131072 + 43253 - 128
    near, far = method.segments()
    assert (near.min_distance, near.max_distance) == (0, 43253)
    assert far.min_distance == 43253 and far.query_map(torch.tensor([50000])).item() == 50000 - 43253 + 128
    assert far.key_map(torch.tensor([7])).item() == 7
    # a small model: the window is capped at the shift, which makes the default plain RoPE
    assert parse("string")[0].resolve(_rope(64)).segments() == (longlab.positions.segments.Segment(),)


def test_dca_defaults_follow_the_official_code():
    method = parse("dca")[0].resolve(_rope(4096))
    assert (method.chunk_size, method.local_window) == (4096 * 3 // 4 - 256, 256)  # chunk_len, local_window
    assert method.reach() is None  # no distance exceeds chunk_size + local_window
    intra, successive, inter = method.segments()
    p = torch.tensor([0, 2815, 2816, 2816 + 255, 2816 + 256, 3 * 2816 + 5])
    assert intra.query_map(p).tolist() == [0, 2815, 0, 255, 256, 5]
    assert successive.query_map(p).tolist() == [2816, 3072, 2816, 3071, 3072, 2821]
    assert inter.query_map(p).tolist() == [3072] * 6
    assert intra.key_map(p).tolist() == [0, 2815, 0, 255, 256, 5]


@pytest.mark.parametrize(
    "spec,message",
    [
        ("string:shift=-1", "'shift' must be an integer >= 0"),
        ("string:window=1.5", "'window' must be an integer"),
        ("string:shift=20,window=30", "'window' must be <= 'shift', got 30 and 20"),
        ("string:attention_factor=0", "'attention_factor' must be a number > 0 and <= 10"),
        ("dca:chunk_size=0", "'chunk_size' must be an integer >= 1"),
        ("dca:local_window=-2", "'local_window' must be an integer >= 0"),
        ("dca:chunk_size=10,local_window=10", "'local_window' must be < 'chunk_size', got 10 and 10"),
    ],
)
def test_bad_parameters_name_parameter_value_and_range(spec, message):
    with pytest.raises(longlab.SpecError, match=message):
        parse(spec)


def test_model_derived_defaults_are_validated_at_resolve():
    with pytest.raises(longlab.SpecError, match="'window' must be <= 'shift', got 32 and 21"):
        parse("string:window=32")[0].resolve(ROPE)  # shift = int(0.33 * 64) = 21
    with pytest.raises(longlab.SpecError, match="'local_window' must be < 'chunk_size'"):
        parse("dca:chunk_size=3")[0].resolve(ROPE)  # local_window = 64 // 16 = 4


def test_check_command_and_composition_with_a_cache_policy(capsys):
    main(["check", "string"])
    main(["check", "dca:chunk_size=1000+snapkv:budget=64"])
    main(["check", "string:shift=100,window=10+logn+snapkv:budget=64"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "string:attention_factor=1.0"
    assert out[1].startswith("dca:chunk_size=1000+snapkv:budget=64")
    assert out[2].startswith("string:shift=100,window=10,attention_factor=1.0+logn+snapkv:budget=64")
    assert [m.kind for m in parse("string+snapkv:budget=64")] == ["position", "cache"]


# -- the kernel at identity settings, and the plan -------------------------------------------------


def _inputs(length, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, length, HEAD_DIM, dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(2, 2, length, HEAD_DIM, dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(2, 2, length, HEAD_DIM, dtype=dtype, generator=g).requires_grad_()
    return q, k, v


@pytest.mark.parametrize(
    "spec", ["string:shift=0", "string:shift=30,window=30", "dca:chunk_size=120,local_window=50", "dca:chunk_size=500"]
)
def test_identity_settings_equal_plain_rope(spec):
    """S = W shifts nothing; a chunk at least as long as the input holds every key (chunk lag 0)."""
    length = 120
    q, k, v = _inputs(length)
    pos = torch.arange(length)[None].expand(2, -1)
    method = parse(spec)[0].resolve(ROPE)
    ours = segmented_attention(q, k, v, pos, pos, method.segments(), method.table(ROPE, length), 0.25, None, 16)
    visible, rel = reference.distances("none", pos[0], pos[0])
    ref = reference.attention(q, k, v, visible, rel, reference.inv_freq(HEAD_DIM), 0.25)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-9)
    grad = torch.randn_like(ref)
    for g, w in zip(torch.autograd.grad(ours, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad), strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-9)


def test_string_attention_factor_scales_cos_and_sin():
    length, factor = 90, 0.1 * math.log(2) + 1  # the official transformers demo's value
    q, k, v = _inputs(length)
    pos = torch.arange(length)[None].expand(2, -1)
    method = parse(f"string:shift=30,window=5,attention_factor={factor!r}")[0].resolve(ROPE)
    ours = segmented_attention(q, k, v, pos, pos, method.segments(), method.table(ROPE, length), 0.25)
    visible, rel = reference.distances("string", pos[0], pos[0], shift=30, window=5)
    ref = reference.attention(q, k, v, visible, rel, reference.inv_freq(HEAD_DIM), 0.25, factor=factor)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-9)


def test_dca_plan_reads_whole_tiles_inside_chunks_and_masks_only_chunk_edges():
    """Chunk lags are bounded per (block, tile) like distances: tiles inside one lag are full (or the
    causal diagonal), only tiles across a chunk edge are masked, and each pair is computed once."""
    length, size = 2048, 64
    method = parse("dca:chunk_size=512,local_window=32")[0]
    pos = torch.arange(length)[None]
    layout = plan(pos, pos, None, method.segments(), size)
    modes = [classify(layout, s) for s in method.segments()]
    assert all((m == MASK).sum() == 0 for m in modes)  # chunk edges on tile edges: no mask at all
    assert (modes[0] == CAUSAL).sum() == length // size and (modes[2] == FULL).sum() > 0
    assert count_pairs(layout, method.segments()) == length * (length + 1) // 2
    odd = parse("dca:chunk_size=500,local_window=32")[0]
    layout = plan(pos, pos, None, odd.segments(), size)
    assert sum(int((classify(layout, s) == MASK).sum()) for s in odd.segments()) > 0
    # a tile across a chunk edge is read by the two segments on either side of the edge, no more
    assert count_pairs(layout, odd.segments()) < 1.2 * length * (length + 1) // 2


def test_attention_mass_for_cache_scores_uses_the_chunks():
    """Eviction scores (SnapKV, H2O, TOVA) see the probabilities DCA's attention uses."""
    length, s, w = 70, 24, 5
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 2, length, HEAD_DIM, generator=g)  # (B, Hk, G, Tq, d)
    k = torch.randn(1, 2, length, HEAD_DIM, generator=g)
    pos = torch.arange(length)
    method = parse(f"dca:chunk_size={s},local_window={w}")[0].resolve(ROPE)
    valid = torch.ones(1, 2, length, dtype=torch.bool)
    got = attention_mass(q, k, pos.expand(1, 2, -1), pos.expand(1, 2, -1), valid, method.segments(),
                         method.table(ROPE, length), 0.25, block=16)  # fmt: skip
    visible, rel = reference.distances("dca", pos, pos, chunk_size=s, local_window=w)
    rotated = reference.rotate_pairwise(q.double().flatten(1, 2), rel, reference.inv_freq(HEAD_DIM))
    keys = k.double().repeat_interleave(2, 1)
    scores = torch.einsum("bhqkd,bhkd->bhqk", rotated, keys) * 0.25
    probs = torch.softmax(scores.masked_fill(~visible, -math.inf), -1)
    want = probs.sum(2).view(1, 2, 2, length)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


# -- a patched model against a forward built by hand from the papers' equations --------------------


def _hand_built_logits(model, ids, name, params):
    """A Llama forward from the model's own weights with attention from support/reference.py."""
    inner = model.model
    inv_freq = inner.rotary_emb.inv_freq.double()
    pos = torch.arange(ids.shape[1])
    visible, rel = reference.distances(name, pos, pos, **params)
    h = inner.embed_tokens(ids)
    for layer in inner.layers:
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        shape = (ids.shape[0], ids.shape[1], -1, attn.head_dim)
        q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        out = reference.attention(q, k, v, visible, rel, inv_freq, attn.scaling)
        h = h + attn.o_proj(out.transpose(1, 2).reshape(ids.shape[0], ids.shape[1], -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(inner.norm(h))


CASES = [
    ("string:shift=40,window=6", "string", {"shift": 40, "window": 6}),
    ("dca:chunk_size=40,local_window=8", "dca", {"chunk_size": 40, "local_window": 8}),
    ("dca:chunk_size=23,local_window=0", "dca", {"chunk_size": 23, "local_window": 0}),
]


@pytest.mark.parametrize("spec,name,params", CASES, ids=[c[0] for c in CASES])
def test_patched_model_equals_the_hand_built_forward(spec, name, params):
    model = build("llama").double()
    ids = torch.randint(3, 128, (2, 3 * L_TRAIN - 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = _hand_built_logits(model, ids, name, params)
        got = longlab.apply(model, spec)(ids).logits
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
    with torch.no_grad():
        plain = longlab.apply(model, "none")(ids).logits
    assert (got - plain).abs().max() > 1e-3  # the method is not plain RoPE at this length


COMPOSED = ["string:shift=30,window=4", "dca:chunk_size=30,local_window=6"]


@pytest.mark.parametrize("spec", COMPOSED)
def test_composes_with_a_cache_policy(spec):
    model = build("llama")
    ids = torch.randint(3, 128, (2, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        alone = longlab.apply(model, spec)(ids, use_cache=False).logits
        longlab.apply(model, spec + "+snapkv:budget=32,window=8")
        assert [m.kind for m in longlab.active_methods(model)] == ["position", "cache"]
        assert spec.split(":")[0] in longlab.describe(model) and "snapkv" in longlab.describe(model)
        torch.testing.assert_close(model(ids, use_cache=False).logits, alone, atol=0, rtol=0)


@pytest.mark.parametrize("spec", COMPOSED)
def test_generation_with_snapkv_holds_the_budget(spec):
    model = build("llama")
    prompt = torch.randint(3, 128, (1, 100), generator=torch.Generator().manual_seed(0))
    longlab.apply(model, spec + "+snapkv:budget=32,window=8")
    tokens = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert tokens.shape[1] == 110
    stats = longlab.cache_stats(model)
    assert all(torch.tensor(layer.tokens).max() == 32 for layer in stats.layers)
    # with a budget above the length nothing is evicted: the same tokens as the method alone
    longlab.apply(model, spec + "+snapkv:budget=1000")
    kept = model.generate(prompt, max_new_tokens=10, do_sample=False)
    longlab.apply(model, spec)
    assert torch.equal(kept, model.generate(prompt, max_new_tokens=10, do_sample=False))
