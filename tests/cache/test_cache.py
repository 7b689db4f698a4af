"""Cache policies: each keeps exactly what its paper's definition says, memory is really freed.

Expected kept sets are computed here from the definitions with naive float64 attention
(tests/reference.py), independent of longlab's scoring code.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

import longlab
import longlab.cache.policies  # registers every policy: the device tests take them all
from longlab.cache.heads import HeadAwarePolicy
from longlab.cache.layer import LonglabLayer
from longlab.cache.policy import EvictionPolicy, ScoreContext
from longlab.cache.quantized import QuantizedEntries, dequantize, pack4, quantize, unpack4
from longlab.cache.scores import attention_mass
from longlab.method import REGISTRY
from longlab.positions import FrequencyTable
from longlab.positions.rope import base_inv_freq
from support.memory import LargestTensor
from support.models import build
from support.reference import distances, inv_freq, rotate_pairwise

B, HK, G, N, D = 2, 2, 2, 48, 16
SCALE = D**-0.5


def _tensors(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HK * G, N, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, HK, N, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, HK, N, D, generator=gen, dtype=torch.float64)
    k[:, 1] *= 3  # head 1 attends sharply, head 0 diffusely: their needs differ (AdaKV)
    return q, k, v


def _compress(spec: str, layer_idx: int = 0, n_layers: int = 1, seed: int = 0) -> tuple[LonglabLayer, torch.Tensor]:
    """Prefill N hand-made tokens into a layer with policy ``spec``; return it and the queries."""
    q, k, v = _tensors(seed)
    positions = torch.arange(N)[None].expand(B, N)
    valid = torch.ones(B, N, dtype=torch.bool)
    layer = LonglabLayer(longlab.parse(spec)[0])
    layer.append(k, v, positions, valid)
    table = FrequencyTable(base_inv_freq(D, 10000.0))
    segments = longlab.parse("none")[0].segments()
    layer.compress(ScoreContext(layer, q, positions, valid, segments, table, SCALE, layer_idx, n_layers))
    return layer, q


def _kept(layer: LonglabLayer) -> list[list[set[int]]]:
    positions = layer.entries.dense("positions")
    return [[set(positions[b, h][positions[b, h] >= 0].tolist()) for h in range(HK)] for b in range(B)]


def _probabilities(q: torch.Tensor, k: torch.Tensor, queries: range) -> torch.Tensor:
    """Naive causal RoPE attention probabilities (B, Hq, len(queries), N) in float64:
    (R(i - j) q_i) . k_j, pair by pair."""
    q_pos = torch.tensor(list(queries))
    visible, rel = distances("none", q_pos, torch.arange(N))
    rotated = rotate_pairwise(q[:, :, q_pos], rel, inv_freq(D))  # (B, Hq, Tq, N, d)
    scores = torch.einsum("bhqkd,bhkd->bhqk", rotated, k.repeat_interleave(G, 1)) * SCALE
    return torch.softmax(scores.masked_fill(~visible, -math.inf), dim=-1)


def _top(scores: torch.Tensor, count: int, exclude: set[int] = frozenset()) -> set[int]:
    ranked = [j for j in sorted(range(len(scores)), key=lambda j: -float(scores[j])) if j not in exclude]
    return set(ranked[:count])


# -- each policy keeps what its definition says -----------------------------------------------------


def test_window_keeps_the_most_recent():
    layer, _ = _compress("window:budget=10")
    assert _kept(layer) == [[set(range(N - 10, N))] * HK] * B


def test_streaming_keeps_sinks_and_recent_and_assigns_slot_positions():
    layer, _ = _compress("streaming:sinks=4,window=12")
    expected = set(range(4)) | set(range(N - 12, N))
    assert _kept(layer) == [[expected] * HK] * B
    # StreamingLLM's rule: the i-th held key is at position i; the next token's query at slot 16
    _, k, v = _tensors(1)
    layer.append(k[:, :, :1], v[:, :, :1], torch.full((B, 1), N), torch.ones(B, 1, dtype=torch.bool))
    _, _, k_pos, key_valid = layer.view()
    q_pos, slots = layer.policy.attention_positions(torch.full((B, 1), N), k_pos, key_valid)
    assert slots[0, 0].tolist() == list(range(17)) and q_pos.tolist() == [[16]] * B


def test_knorm_keeps_the_smallest_norms():
    layer, _ = _compress("knorm:budget=15")
    _, k, _ = _tensors()
    norms = k.norm(dim=-1)
    assert _kept(layer) == [[_top(-norms[b, h], 15) for h in range(HK)] for b in range(B)]


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_snapkv_pools_window_attention_and_keeps_the_window(pooling):
    window, kernel, budget = 8, 5, 20
    layer, q = _compress(f"snapkv:budget={budget},window={window},kernel={kernel},pooling={pooling}")
    _, k, _ = _tensors()
    probs = _probabilities(q, k, range(N - window, N))  # (B, Hq, w, N)
    mass = probs.sum(dim=2).view(B, HK, G, N).mean(dim=2)
    # pooling by definition: the mean (zeros beyond the ends count) or the max over j-2 .. j+2
    padded = F.pad(mass, (kernel // 2, kernel // 2), value=0.0 if pooling == "avg" else -math.inf)
    windows = padded.unfold(-1, kernel, 1)
    pooled = windows.mean(dim=-1) if pooling == "avg" else windows.amax(dim=-1)
    recent = set(range(N - window, N))
    expected = [[recent | _top(pooled[b, h], budget - window, recent) for h in range(HK)] for b in range(B)]
    assert _kept(layer) == expected


def test_h2o_keeps_heavy_hitters_and_recent_tokens():
    budget = 16
    layer, q = _compress(f"h2o:budget={budget},recent=0.25")
    _, k, _ = _tensors()
    mass = _probabilities(q, k, range(N)).sum(dim=2).view(B, HK, G, N).mean(dim=2)  # every query's attention
    recent = set(range(N - 4, N))
    assert _kept(layer) == [[recent | _top(mass[b, h], budget - 4, recent) for h in range(HK)] for b in range(B)]
    torch.testing.assert_close(
        layer.entries.dense("mass").double(),
        mass.gather(-1, layer.entries.dense("positions").long()),
        atol=1e-5,
        rtol=0,
    )


def test_tova_uses_the_last_query_averaged_over_all_heads():
    layer, q = _compress("tova:budget=12")
    _, k, _ = _tensors()
    last = _probabilities(q, k, range(N - 1, N))[:, :, 0].mean(dim=1)  # (B, N): one set per layer
    assert _kept(layer) == [[_top(last[b], 12)] * HK for b in range(B)]


def test_pyramidkv_budgets_fall_linearly_and_average_the_budget():
    layers = [_compress("pyramidkv:budget=20,window=4,beta=4", layer_idx=i, n_layers=5)[0] for i in range(5)]
    counts = [int(layer.entries.counts()[0, 0]) for layer in layers]
    top, bottom = 20 / 4, 2 * 20 - 20 / 4
    assert counts == [round(bottom - i * (bottom - top) / 4) for i in range(5)]
    assert sum(counts) / 5 == pytest.approx(20, abs=0.5)


def test_adakv_shares_one_layer_budget_across_heads_by_score():
    budget, window = 12, 4
    layer, q = _compress(f"adakv:budget={budget},window={window},kernel=1,floor=0.25")
    _, k, _ = _tensors()
    mass = _probabilities(q, k, range(N - window, N)).sum(dim=2).view(B, HK, G, N).mean(dim=2)
    recent = set(range(N - window, N))
    for b in range(B):
        # safeguard: each head's own best floor(0.25 * 12) = 3 (the window first), then the best of all heads
        scores = {(h, j): (math.inf if j in recent else float(mass[b, h, j])) for h in range(HK) for j in range(N)}
        chosen = {(h, j) for h in range(HK) for j in sorted(range(N), key=lambda j: -scores[(h, j)])[:3]}
        rest = sorted((key for key in scores if key not in chosen), key=lambda key: -scores[key])
        chosen |= set(rest[: budget * HK - len(chosen)])
        assert _kept(layer)[b] == [{j for h2, j in chosen if h2 == h} for h in range(HK)]
    counts = layer.entries.counts()
    assert counts.sum(dim=1).tolist() == [budget * HK] * B
    assert not layer.entries.equal  # heads hold different counts, stored packed
    per_entry = 2 * D * 8 + 4  # keys, values, position
    assert layer.entries.nbytes == int(counts.sum()) * per_entry


def test_random_is_seeded_and_keeps_the_budget():
    a, _ = _compress("random:budget=10,seed=1")
    b, _ = _compress("random:budget=10,seed=1")
    c, _ = _compress("random:budget=10,seed=2")
    assert _kept(a) == _kept(b) != _kept(c)
    assert all(len(s) == 10 for row in _kept(a) for s in row)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_ratio_removes_that_fraction(ratio):
    layer, _ = _compress(f"snapkv:ratio={ratio},window=4")
    assert layer.entries.counts().unique().tolist() == [math.ceil((1 - ratio) * N)]


@pytest.mark.parametrize(
    "spec", ["window:budget=10", "knorm:budget=7", "snapkv:budget=12,window=4", "h2o:budget=9", "tova:ratio=0.5"]
)
def test_bytes_held_are_the_kept_entries(spec):
    layer, _ = _compress(spec)
    per_entry = 2 * D * 8 + 4 + (4 if spec.startswith("h2o") else 0)  # keys, values, position, score
    assert layer.entries.nbytes == int(layer.entries.counts().sum()) * per_entry
    assert layer.nbytes == layer.entries.nbytes


# -- quantized caches -----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_error_is_at_most_half_a_step(bits):
    x = torch.randn(2, 3, 64, 32) * torch.logspace(-2, 1, 32)  # channels of very different ranges
    for dim in (2, -1):
        codes, scale, zero = quantize(x, bits, dim)
        if bits == 4:
            assert torch.equal(unpack4(pack4(codes)), codes)
        step = (x.amax(dim=dim, keepdim=True) - x.amin(dim=dim, keepdim=True)) / (2**bits - 1)
        assert ((dequantize(codes, scale, zero) - x).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_cache_keeps_a_full_precision_residual(bits):
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1, 2, 150, 32, generator=gen), torch.randn(1, 2, 150, 32, generator=gen)
    meta = {"positions": torch.arange(150, dtype=torch.int32).expand(1, 2, 150)}
    first, rest = ({name: x[:, :, part] for name, x in meta.items()} for part in (slice(100), slice(100, None)))
    store = QuantizedEntries({"keys": keys[:, :, :100], "values": values[:, :, :100], **first}, bits, 64, 16)
    store.append({"keys": keys[:, :, 100:], "values": values[:, :, 100:], **rest})
    assert len(store.blocks) == 2 and store.tail["keys"].shape[2] == 150 - 128
    assert torch.equal(store.dense("keys")[:, :, 128:], keys[:, :, 128:])  # the residual is exact
    k_step = (keys[:, :, :64].amax(2) - keys[:, :, :64].amin(2)) / (2**bits - 1)  # per channel over a block
    assert ((store.dense("keys")[:, :, :64] - keys[:, :, :64]).abs() <= k_step[:, :, None] / 2 + 1e-6).all()
    v = values[:, :, :128].reshape(1, 2, 128, 2, 16)
    v_step = (v.amax(-1, keepdim=True) - v.amin(-1, keepdim=True)) / (2**bits - 1)  # per token, 16 channels
    assert ((store.dense("values")[:, :, :128].reshape(v.shape) - v).abs() <= v_step / 2 + 1e-6).all()
    codes = 2 * 64 * 32 * bits // 8  # per block and tensor: heads x tokens x channels
    key_stats, value_stats = 2 * (2 * 32 * 4), 2 * (2 * 64 * 2 * 4)  # scale and zero, float32
    tail, meta = 2 * (2 * 22 * 32 * 4), 2 * 150 * 4
    assert store.nbytes == 2 * (2 * codes + key_stats + value_stats) + tail + meta


# -- on a model: generate(), budgets, chunked prefill, composition --------------------------------


def _prompt(length: int = 60, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_full_equals_no_policy():
    model = build("llama")
    ids = _prompt(70, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # a left-padded row
    outputs = {}
    for spec in ("none", "full", "full:chunk=16"):
        longlab.apply(model, spec)
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, use_cache=True).logits[:, -1]
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        outputs[spec] = (logits, tokens)
    assert torch.equal(outputs["none"][0], outputs["full"][0])
    assert torch.equal(outputs["none"][1], outputs["full"][1])
    torch.testing.assert_close(outputs["none"][0], outputs["full:chunk=16"][0], atol=1e-5, rtol=0)
    assert torch.equal(outputs["none"][1], outputs["full:chunk=16"][1])


@pytest.mark.parametrize("spec", ["snapkv:budget=24,window=8", "h2o:budget=24", "adakv:budget=24,window=8",
                                  "streaming:sinks=4,window=20", "tova:budget=24", "kv_int4:residual=16"])  # fmt: skip
def test_generation_holds_the_budget_while_decoding(spec):
    model = build("llama")
    longlab.apply(model, "yarn:factor=4+" + spec)
    assert [m.kind for m in longlab.active_methods(model)] == ["position", "cache"]
    tokens = model.generate(_prompt(60), max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert tokens.shape[1] == 70
    stats = longlab.cache_stats(model)
    assert stats.seen == 69  # the last generated token is never fed back
    for layer in stats.layers:
        held = torch.tensor(layer.tokens)
        if spec.startswith("adakv"):
            assert held.sum(dim=1).tolist() == [24 * 2]
        elif spec.startswith("kv_int4"):
            assert held.unique().tolist() == [69]
        else:
            assert held.unique().tolist() == [24]  # 24 / 128 < 1: no decoding slack at this budget
    assert stats.bytes_held < stats.bytes_full


def test_decoding_evicts_with_slack_and_never_exceeds_the_budget():
    model = build("llama", num_hidden_layers=1)
    longlab.apply(model, "snapkv:budget=128,window=8")
    held = []
    ids = _prompt(120)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = out.past_key_values
        for _ in range(40):
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
            held.append(int(cache.layers[0].entries.counts().max()))
    assert max(held) == 128 and min(held[10:]) == 128 - 128 // 128  # between 127/128 of the budget and it
    assert cache.get_seq_length() == 160


def test_chunked_prefill_bounds_what_the_cache_holds():
    model = build("llama", num_hidden_layers=1)
    longlab.apply(model, "snapkv:budget=16,window=4,chunk=10")
    held = []
    layer_forward = model.model.layers[0].self_attn.forward

    def spy(*args, **kwargs):
        out = layer_forward(*args, **kwargs)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers >= 5.24 names it `cache`
        held.append(int(cache.layers[0].entries.counts().max()))
        return out

    model.model.layers[0].self_attn.forward = spy
    with torch.no_grad():
        model(_prompt(95), use_cache=True)
    assert len(held) == 10  # 95 tokens in chunks of 10
    assert max(held) == 16


def test_per_head_caches_attend_exactly_over_what_each_head_kept():
    """After per-head eviction (K-norm keeps different tokens in each head) a decoding step's attention
    equals naive attention over each head's own kept keys."""
    model = build("llama", num_hidden_layers=1)
    longlab.apply(model, "knorm:budget=20")
    ids = _prompt(40)
    with torch.no_grad():
        out = model(ids, use_cache=True)
    cache = out.past_key_values
    layer = cache.layers[0]
    keys, values, positions, _ = layer.view()
    assert not all(torch.equal(positions[0, 0], positions[0, h]) for h in range(positions.shape[1]))
    captured = {}
    attn = model.model.layers[0].self_attn
    hooks = [
        attn.o_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("out", a[0])),
        attn.q_proj.register_forward_hook(lambda m, a, o: captured.__setitem__("q", o)),
        attn.k_proj.register_forward_hook(lambda m, a, o: captured.__setitem__("k", o)),
        attn.v_proj.register_forward_hook(lambda m, a, o: captured.__setitem__("v", o)),
    ]
    with torch.no_grad():
        model(torch.tensor([[5]]), past_key_values=cache, use_cache=True)
    for hook in hooks:
        hook.remove()
    hq, hk, d = 4, 2, 16
    q = captured["q"].view(1, 1, hq, d).transpose(1, 2).double()
    new_k = captured["k"].view(1, 1, hk, d).transpose(1, 2).double()
    new_v = captured["v"].view(1, 1, hk, d).transpose(1, 2).double()
    expected = []
    for h in range(hq):
        kv = h // (hq // hk)
        k_pos = torch.cat((positions[0, kv], torch.tensor([40])))
        k = torch.cat((keys[0, kv].double(), new_k[0, kv]))[None, None]
        v = torch.cat((values[0, kv].double(), new_v[0, kv]))[None, None]
        _, rel = distances("none", torch.tensor([40]), k_pos)
        rotated = rotate_pairwise(q[:, h : h + 1], rel, inv_freq(d))  # R(i - j) q against unrotated keys
        scores = torch.einsum("bhqkd,bhkd->bhqk", rotated, k) * d**-0.5
        expected.append(torch.softmax(scores, -1) @ v)
    expected = torch.cat(expected, dim=1).transpose(1, 2).reshape(1, 1, hq * d)
    torch.testing.assert_close(captured["out"].double(), expected, atol=1e-5, rtol=0)


def test_policies_compose_with_position_methods_and_reject_two_caches():
    model = build("llama")
    longlab.apply(model, "selfextend:group=4,window=16+full")
    ids = _prompt(100)
    with torch.no_grad():
        with_full = model(ids, use_cache=True).logits
        longlab.apply(model, "selfextend:group=4,window=16")
        alone = model(ids, use_cache=True).logits
    assert torch.equal(with_full, alone)
    assert "snapkv" in longlab.describe(longlab.apply(model, "yarn:factor=4+snapkv:budget=1k"))
    with pytest.raises(longlab.SpecError, match="two cache methods"):
        longlab.parse("snapkv:budget=8+h2o:budget=8")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("snapkv", "give exactly one of 'budget'"),
        ("snapkv:budget=8,ratio=0.5", "give exactly one of 'budget'"),
        ("h2o:ratio=1", "'ratio' must be < 1"),
        ("snapkv:budget=8,kernel=4", "'kernel' must be odd"),
        ("snapkv:budget=8,pooling=median", "'pooling' must be one of avg, max"),
        ("kv_int8:residual=0", "'residual' must be an integer >= 1"),
        ("streaming:window=0", "'window' must be an integer >= 1"),
    ],
)
def test_bad_cache_specs_name_the_parameter(spec, message):
    with pytest.raises(longlab.SpecError, match=message):
        longlab.parse(spec)


def _largest_scoring_tensor(length: int) -> int:
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, length, D, generator=gen), torch.randn(1, 1, length, D, generator=gen)
    positions = torch.arange(length)[None, None]
    table = FrequencyTable(base_inv_freq(D, 10000.0))
    segments = longlab.parse("rerope:window=100")[0].segments()
    with LargestTensor() as probe:
        attention_mass(q, k, positions, positions, torch.ones(1, 1, length, dtype=torch.bool), segments, table, 0.25)
    return probe.largest


def test_scores_over_every_query_never_build_an_l_by_l_matrix():
    """H2O sums the attention of every prompt query: done in query blocks, memory linear in length."""
    small, large = _largest_scoring_tensor(1024), _largest_scoring_tensor(4096)
    assert large < 4096 * 4096 / 16, large
    assert large <= 4 * small * 1.1


# -- every device: nothing made off the inputs' device, the cache stays where the model is ---------

# parameters for the policies that take no budget; every eviction policy keeps 40 entries per head
_DEVICE_PARAMS = {
    "full": "",
    "streaming": "sinks=4,window=36",
    "kv_int8": "residual=16",
    "kv_int4": "residual=16,group=8",
    "retrieval_attention": "sinks=4,window=36,top_k=8",
    "quest": "budget=32,page=8,skip_layers=1",
}


def _device_specs() -> list[str]:
    """Every registered cache policy (one added later joins by itself), whole and chunked prefill."""
    specs = ["snapkv:budget=40,pooling=max", "h2o:ratio=0.5,chunk=48"]
    for name, cls in sorted(REGISTRY.items()):
        # head-aware policies need head scores measured on a real model: test_head_aware.py runs them
        if getattr(cls, "kind", None) == "cache" and not issubclass(cls, HeadAwarePolicy):
            params = _DEVICE_PARAMS.get(name, "budget=40" if issubclass(cls, EvictionPolicy) else "")
            specs += [f"{name}:{params}" if params else name, f"{name}:{params + ',' if params else ''}chunk=32"]
    return specs


def _stored(entries) -> list[torch.Tensor]:
    """Every tensor a layer's store holds."""
    if isinstance(entries, QuantizedEntries):
        blocks = [t for block in entries.blocks for t in (*block.k, *block.v)]
        return [*blocks, *entries.tail.values(), *_stored(entries.meta)]
    return [*entries.fields.values(), entries.lengths]


@pytest.mark.parametrize("spec", _device_specs())
def test_every_cache_policy_keeps_its_cache_on_the_inputs_device(strict_device, device, spec):
    """Prefill (whole or in chunks), eviction, quantization, decoding and cache_stats of a padded batch
    under ``strict_device``: no tensor made off the inputs' device, every stored tensor on it, and the
    statistics are the store's own counts."""
    model = longlab.apply(build().to(device), spec)
    ids = torch.randint(3, 128, (2, 150), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :37] = 0
    cache = DynamicCache()
    with strict_device(), torch.no_grad():
        tokens = model.generate(
            ids, attention_mask=mask, past_key_values=cache, max_new_tokens=4, min_new_tokens=4, do_sample=False
        )
        stats = longlab.cache_stats(cache)
    assert tokens.shape == (2, 154) and tokens.device == ids.device
    assert stats.seen == 153 and len(stats.layers) == len(cache.layers) == 2  # the last token is never fed back
    for layer, layer_stats in zip(cache.layers, stats.layers, strict=True):
        assert all(t.device == ids.device for t in _stored(layer.entries)), spec
        assert layer_stats.tokens == layer.entries.counts().tolist()
        assert layer_stats.bytes_held == layer.nbytes > 0
    assert longlab.cache_stats(model) == stats  # what the model recorded after its last call


def test_device_specs_cover_every_registered_cache_policy():
    specs = _device_specs()
    names = {spec.split(":")[0] for spec in specs}
    assert names == {"adakv", "expected_attention", "full", "h2o", "knorm", "kv_int4", "kv_int8", "kvzip", "pyramidkv",
                     "quest", "random", "retrieval_attention", "snapkv", "streaming", "tova", "window"}  # fmt: skip
    assert all(any(s.startswith(name) and s.endswith("chunk=32") for s in specs) for name in names)


def test_random_draws_one_stream_on_every_device(device):
    """Random eviction draws from the host's generator and moves the draws: the CPU's draws stay what
    they were, and every device evicts the same entries for the same seed."""
    q, k, v = (x.to(device) for x in _tensors())
    positions = torch.arange(N, device=device)[None].expand(B, N)
    valid = torch.ones(B, N, dtype=torch.bool, device=device)
    policy = longlab.parse("random:budget=10,seed=3")[0]
    layer = LonglabLayer(policy)
    layer.append(k, v, positions, valid)
    table = FrequencyTable(base_inv_freq(D, 10000.0))
    ctx = ScoreContext(layer, q, positions, valid, longlab.parse("none")[0].segments(), table, SCALE, 1, 2)
    scores = policy.scores(ctx)
    seed = 3 * 1_000_003 + 1 * 65_537 + N  # (seed, layer, tokens seen)
    want = torch.rand((B, HK, N), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert scores.device == q.device and torch.equal(scores.cpu(), want)


def test_a_read_that_moves_the_calls_own_tokens_is_refused():
    """The kernel takes a call's queries to be the last keys: a policy whose reads() put other entries
    after them (a trailing padding slot, here) gets a clear error instead of a silently wrong output."""
    from dataclasses import dataclass

    from longlab.cache.policy import CachePolicy, Reads, Scoring
    from longlab.errors import LonglabError
    from longlab.positions.segments import Segment

    @dataclass(frozen=True)
    class TrailingPadding(CachePolicy):
        name = "trailing_padding"

        def reads(self, ctx, keys, values, k_pos, key_valid):
            pad = lambda x, fill: torch.cat((x, x[:, :, :1].clone().fill_(fill)), dim=2)  # noqa: E731
            return Reads(pad(keys, 0), pad(values, 0), pad(k_pos, -1), pad(key_valid, False), 0)

    table = FrequencyTable(inv_freq(8))
    scoring = Scoring((Segment(),), lambda length: table, 8**-0.5, 0, 1)
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    pos, valid = torch.arange(4)[None], torch.ones(1, 4, dtype=torch.bool)
    never = lambda *args: pytest.fail("attention ran over a read that moved the queries")  # noqa: E731
    with pytest.raises(LonglabError, match="last keys"):
        LonglabLayer(TrailingPadding()).attend(q, k, v, pos, valid, never, scoring)
    out = LonglabLayer(CachePolicy()).attend(q, k, v, pos, valid, lambda q, *rest: torch.zeros_like(q), scoring)
    assert out.shape == q.shape  # the default read passes the check
