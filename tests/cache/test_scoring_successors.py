"""Expected Attention and KVzip against naive references written here from the papers.

Expected Attention: the Gaussian expected attention with an explicit d x d average rotation matrix,
key by key and future query by future query, with distances from tests/support/reference.py (not
longlab's segments). KVzip: the max attention of the reconstruction queries, read off transformers'
own eager attention weights (and longlab's output_attentions under a position method) over the
context followed by the reconstruction input in one plain forward pass.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

import longlab
from longlab.cache.layer import LonglabLayer
from longlab.cache.policy import ScoreContext
from longlab.cache.reconstruction import compress_with_reconstruction, reconstruction_inputs
from longlab.errors import LonglabError, SpecError
from longlab.positions.rope import RopeConfig
from support import reference
from support.models import build

B, HK, G, N, D = 2, 2, 2, 40, 16
ROPE = RopeConfig(D, 10000.0, 64, reference.inv_freq(D))


def _tensors(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HK * G, N, D, generator=gen, dtype=torch.float64) + 0.5  # a non-zero mean
    k = torch.randn(B, HK, N, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, HK, N, D, generator=gen, dtype=torch.float64)
    return q, k, v


def _context(spec: str, position: str = "none", seed: int = 0) -> tuple[LonglabLayer, ScoreContext]:
    """A layer holding N hand-made tokens under cache policy ``spec``, and the prefill's ScoreContext."""
    q, k, v = _tensors(seed)
    positions = torch.arange(N)[None].expand(B, N)
    valid = torch.ones(B, N, dtype=torch.bool)
    method = longlab.parse(position)[0].resolve(ROPE)
    layer = LonglabLayer(longlab.parse(spec)[0])
    layer.append(k, v, positions, valid)
    ctx = ScoreContext(layer, q, positions, valid, method.segments(), method.table(ROPE, N), D**-0.5, 0, 1)
    return layer, ctx


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """The d x d RoPE matrix (RoFormer eq. 34, channel pairs (i, i + d/2)) for angles (d/2,)."""
    c, s = torch.diag(angles.cos()), torch.diag(angles.sin())
    return torch.cat((torch.cat((c, -s), 1), torch.cat((s, c), 1)), 0)


def _expected_attention(q, k, v, name, params, future, sinks=4, covariance=True, vnorm=True, epsilon=0.0):
    """Devoto et al. 2025 (section 3, as kvpress computes it), one key at a time: the queries at
    positions >= sinks are N(mu, Sigma); R̄_j is the mean of the rotation matrices the future queries at
    N..N+future-1 apply to key j (zero when none sees it); z_j = (R̄_j mu)·k_j/√d + k_jᵀ R̄_j Σ R̄_jᵀ
    k_j/(2d); softmax over non-sink keys, mean over the query group, times (· + epsilon)·‖v_j‖; sinks
    kept (inf)."""
    freqs = reference.inv_freq(D)
    visible, rel = reference.distances(name, torch.arange(N, N + future), torch.arange(N), **params)
    used = q[:, :, sinks:]
    mean = used.mean(dim=2)
    centred = used - mean[:, :, None]
    cov = torch.einsum("bhti,bhtj->bhij", centred, centred) / used.shape[2]
    out = torch.zeros(B, HK, N, dtype=torch.float64)
    for b in range(B):
        for h in range(HK):
            logits = torch.full((G, N), -math.inf, dtype=torch.float64)
            for j in range(sinks, N):
                seen = [t for t in range(future) if visible[t, j]]
                if not seen:
                    continue
                average = sum(_rotation(rel[t, j] * freqs) for t in seen) / len(seen)
                for g in range(G):
                    head = h * G + g
                    logit = (average @ mean[b, head]) @ k[b, h, j] / math.sqrt(D)
                    if covariance:
                        logit += k[b, h, j] @ average @ cov[b, head] @ average.T @ k[b, h, j] / (2 * D)
                    logits[g, j] = logit
            probabilities = torch.softmax(logits, dim=-1).nan_to_num(0.0).mean(dim=0)
            if vnorm:
                probabilities = (probabilities + epsilon) * v[b, h].norm(dim=-1)
            probabilities[torch.isinf(logits[0])] = 0.0
            out[b, h] = probabilities
    out[:, :, :sinks] = math.inf
    return out


REMAPS = [
    ("none", "none", {}),
    ("selfextend:group=4,window=8", "selfextend", {"group": 4, "window": 8}),
    ("rerope:window=12", "rerope", {"window": 12}),
    ("dca:chunk_size=14,local_window=4", "dca", {"chunk_size": 14, "local_window": 4}),
    ("lm_infinite:band=20,n_global=3", "lm_infinite", {"band": 20, "n_global": 3, "original_length": 64}),
    ("string:shift=20,window=4", "string", {"shift": 20, "window": 4}),
]


@pytest.mark.parametrize(("position", "name", "params"), REMAPS)
def test_expected_attention_scores_are_the_papers_expectation_under_each_position_method(position, name, params):
    layer, ctx = _context("expected_attention:budget=20,future=16", position)
    ours = layer.policy.scores(ctx)
    expected = _expected_attention(ctx.q, ctx.keys, layer.entries.dense("values"), name, params, future=16)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)
    if name == "lm_infinite":  # keys out of every future query's band and not global score 0
        assert (ours[..., 4:21] == 0).all() and (ours[..., 21:] > 0).all()  # band 20 from t = 40..55


@pytest.mark.parametrize("options", [{"covariance": False}, {"vnorm": False}, {"epsilon": 0.02, "sinks": 0}])
def test_expected_attention_options_drop_their_terms(options):
    spec = "expected_attention:budget=20,future=8," + ",".join(f"{k}={str(v).lower()}" for k, v in options.items())
    layer, ctx = _context(spec, "selfextend:group=4,window=8")
    expected = _expected_attention(ctx.q, ctx.keys, layer.entries.dense("values"), "selfextend",
                                   {"group": 4, "window": 8}, future=8, **options)  # fmt: skip
    torch.testing.assert_close(layer.policy.scores(ctx), expected, rtol=1e-9, atol=1e-12)


def test_expected_attention_degenerates_to_the_attention_of_the_mean_query():
    """One future position, no covariance, no value norm, no sinks: the score is the softmax the mean
    query would give each key from the next position — plain attention (naive, float64)."""
    layer, ctx = _context("expected_attention:budget=20,future=1,covariance=false,vnorm=false,sinks=0")
    mean = ctx.q.mean(dim=2, keepdim=True)  # (B, Hq, 1, D)
    _, rel = reference.distances("none", torch.tensor([N]), torch.arange(N))
    rotated = reference.rotate_pairwise(mean, rel, reference.inv_freq(D))  # (B, Hq, 1, N, D)
    logits = torch.einsum("bhqkd,bhkd->bhqk", rotated, ctx.keys.repeat_interleave(G, 1)) / math.sqrt(D)
    expected = torch.softmax(logits, dim=-1)[:, :, 0].view(B, HK, G, N).mean(dim=2)
    torch.testing.assert_close(layer.policy.scores(ctx), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("window", [0, 6])
def test_expected_attention_keeps_its_top_scores_the_sinks_and_the_window(window):
    layer, ctx = _context(f"expected_attention:budget=14,future=16,window={window}", "selfextend:group=4,window=8")
    expected = _expected_attention(ctx.q, ctx.keys, layer.entries.dense("values"), "selfextend",
                                   {"group": 4, "window": 8}, future=16)  # fmt: skip
    expected[..., N - window :] = math.inf  # the last `window` tokens are always kept
    layer.compress(ctx)
    positions = layer.entries.dense("positions")
    for b in range(B):
        for h in range(HK):
            top = set(torch.sort(expected[b, h], descending=True, stable=True).indices[:14].tolist())
            assert set(positions[b, h].tolist()) == top
            assert set(range(4)) | set(range(N - window, N)) <= top


# -- KVzip ------------------------------------------------------------------------------------------


class _Tokenizer:
    """Enough of a tokenizer for the repeat prompts: one id per character, inside the test vocabulary."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [3 + ord(c) % 100 for c in text]


CONTEXT = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(1))


def _kvzip(spec: str, model=None) -> tuple[torch.nn.Module, DynamicCache, list[torch.Tensor]]:
    model = longlab.apply(model if model is not None else build("llama"), spec)
    cache = DynamicCache()
    with torch.no_grad():
        model(CONTEXT, past_key_values=cache, use_cache=True)
    return model, cache, compress_with_reconstruction(model, _Tokenizer(), CONTEXT, cache)


def _reference_scores(spec: str, position: str = "none") -> list[torch.Tensor]:
    """Section 3 / 3.3 by hand: for each span, the context then its reconstruction input in ONE plain
    forward pass with attention weights (transformers' eager attention for plain RoPE, else longlab's
    output_attentions under the position method); each weight row renormalised over the span's keys
    (the first sinks, the span, the reconstruction tokens); max over those rows and the query group."""
    policy = longlab.parse(spec)[0]
    model = build("llama")
    if position == "none":
        model.set_attn_implementation("eager")
    else:
        longlab.apply(model, position)
    n = CONTEXT.shape[1]
    scores = None
    for start, stop, inputs in reconstruction_inputs(_Tokenizer(), CONTEXT, policy):
        with torch.no_grad():
            out = model(torch.cat((CONTEXT, inputs), dim=1), output_attentions=True, use_cache=False)
        if scores is None:
            scores = [torch.zeros(1, HK, n, dtype=torch.float64) for _ in out.attentions]
        columns = [j for j in range(n + inputs.shape[1]) if j < min(policy.sinks, start) or start <= j < stop or j >= n]
        for layer, weights in enumerate(out.attentions):
            rows = weights[0, :, n:].double()[..., columns]  # (Hq, T, columns)
            rows = rows / rows.sum(dim=-1, keepdim=True)
            best = rows.amax(dim=1).view(HK, G, -1).amax(dim=1)  # max over queries, then the group
            inside = [c for c, j in enumerate(columns) if start <= j < stop]
            scores[layer][0, :, start:stop] = best[:, inside]
    return scores


@pytest.mark.parametrize("spec", ["kvzip:ratio=0.5", "kvzip:ratio=0.5,span=16,tail=3"])
def test_kvzip_scores_are_the_max_attention_of_the_reconstruction_queries(spec):
    _, _, ours = _kvzip(spec)
    for layer_scores, expected in zip(ours, _reference_scores(spec), strict=True):
        torch.testing.assert_close(layer_scores.double(), expected, rtol=1e-4, atol=1e-6)


def test_kvzip_composes_with_a_position_method():
    position = "selfextend:group=4,window=8"
    _, _, ours = _kvzip(f"{position}+kvzip:ratio=0.5,span=16")
    for layer_scores, expected in zip(ours, _reference_scores("kvzip:ratio=0.5,span=16", position), strict=True):
        torch.testing.assert_close(layer_scores.double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("allocation", ["global", "layer", "head"])
def test_kvzip_keeps_the_best_scores_by_its_allocation(allocation):
    _, cache, scores = _kvzip(f"kvzip:budget=10,allocation={allocation}")
    kept = [layer.entries.dense("positions")[0] for layer in cache.layers]  # (Hk, ≤N)
    held = [layer.entries.counts()[0] for layer in cache.layers]
    assert sum(int(c.sum()) for c in held) == 10 * HK * len(cache.layers)  # the same total in every case
    if allocation == "head":
        assert all(c.tolist() == [10] * HK for c in held)
    if allocation == "global":  # one threshold over every layer and head
        flat = torch.cat([s.flatten() for s in scores])
        threshold = torch.sort(flat, descending=True).values[10 * HK * len(cache.layers) - 1]
    for layer, (positions, s) in enumerate(zip(kept, scores, strict=True)):
        groups = [s[0, h] for h in range(HK)] if allocation == "head" else [s[0].flatten()]
        for h in range(HK):
            ours = set(positions[h][positions[h] >= 0].tolist())
            if allocation == "global":
                assert ours == {j for j in range(CONTEXT.shape[1]) if s[0, h, j] >= threshold}
            elif allocation == "head":
                assert ours == set(torch.topk(groups[h], 10).indices.tolist())
        if allocation == "layer":
            top = set(torch.topk(groups[0], 10 * HK).indices.tolist())
            assert {h * CONTEXT.shape[1] + j for h in range(HK) for j in kept[layer][h].tolist() if j >= 0} == top


def test_kvzip_generation_continues_from_the_compressed_cache():
    model, cache, _ = _kvzip("yarn:factor=4+kvzip:ratio=0.5")
    stats = longlab.cache_stats(cache)
    assert stats.seen == CONTEXT.shape[1]
    assert sum(t for layer in stats.layers for row in layer.tokens for t in row) == 20 * HK * len(cache.layers)
    tokens = model.generate(torch.cat((CONTEXT, CONTEXT[:, :1]), 1), past_key_values=cache, max_new_tokens=5,
                            min_new_tokens=5, do_sample=False)  # fmt: skip
    assert tokens.shape[1] == CONTEXT.shape[1] + 6
    assert longlab.cache_stats(cache).seen == CONTEXT.shape[1] + 5  # decoding appends, as in the paper


# -- identity: a budget that keeps everything is the plain model ---------------------------------------


def test_a_budget_above_the_length_is_the_plain_model():
    ids = torch.cat((CONTEXT, CONTEXT[:, :9]), dim=1)
    model = build("llama")
    longlab.apply(model, "none")
    with torch.no_grad():
        plain = model(ids).logits[:, -9:]
    longlab.apply(model, "expected_attention:budget=1000")
    with torch.no_grad():
        cache = DynamicCache()
        model(CONTEXT, past_key_values=cache, use_cache=True)
        ea = model(ids[:, -9:], past_key_values=cache, use_cache=True).logits
    model, cache, _ = _kvzip("kvzip:budget=1000", model)
    with torch.no_grad():  # the reconstruction pass left the cache exactly as the context made it
        kvzip = model(ids[:, -9:], past_key_values=cache, use_cache=True).logits
    # a prefill then a 9-token call sums in another order than one call over all (thread count too): close, not equal
    torch.testing.assert_close(ea, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kvzip, ea, rtol=0, atol=0)  # the same calls over the same cache: bit-equal


# -- composition, errors, devices ---------------------------------------------------------------------


def test_expected_attention_holds_its_budget_under_a_position_method():
    model = longlab.apply(build("llama"), "selfextend:group=4,window=16+expected_attention:budget=24,future=32")
    tokens = model.generate(CONTEXT, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert tokens.shape[1] == CONTEXT.shape[1] + 6
    assert {t for layer in longlab.cache_stats(model).layers for row in layer.tokens for t in row} == {24}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("expected_attention:budget=8,future=0", "'future'"),
        ("expected_attention:budget=8,epsilon=-1", "'epsilon'"),
        ("expected_attention:budget=8,sinks=-1", "'sinks'"),
        ("expected_attention:budget=8,window=-2", "'window'"),
        ("kvzip:ratio=0.5,allocation=layers", "'allocation' must be one of global, layer, head"),
        ("kvzip:ratio=0.5,span=0", "'span'"),
        ("kvzip:budget=4,ratio=0.5", "exactly one of 'budget'"),
    ],
)
def test_bad_specs_name_the_parameter(spec, message):
    with pytest.raises(SpecError, match=message):
        longlab.parse(spec)


def test_reconstruction_refuses_what_it_cannot_score():
    model = longlab.apply(build("llama"), "snapkv:budget=8")
    cache = DynamicCache()
    with torch.no_grad():
        model(CONTEXT, past_key_values=cache, use_cache=True)
    with pytest.raises(LonglabError, match="'kvzip' cache policy"):
        compress_with_reconstruction(model, _Tokenizer(), CONTEXT, cache)
    model, cache, _ = _kvzip("kvzip:ratio=0.5")
    with pytest.raises(LonglabError, match="already compressed"):
        compress_with_reconstruction(model, _Tokenizer(), CONTEXT, cache)
    cache = DynamicCache()
    with torch.no_grad():
        model(CONTEXT.expand(2, -1), past_key_values=cache, use_cache=True)
    with pytest.raises(LonglabError, match="batch 1"):
        compress_with_reconstruction(model, _Tokenizer(), CONTEXT.expand(2, -1), cache)


def test_reconstruction_keeps_the_cache_on_the_inputs_device(strict_device, device):
    model = longlab.apply(build("llama").to(device), "selfextend:group=4,window=8+kvzip:ratio=0.5,span=16")
    ids = CONTEXT.to(device)
    cache = DynamicCache()
    with strict_device(), torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        scores = compress_with_reconstruction(model, _Tokenizer(), ids, cache)
    assert all(s.device == ids.device for s in scores)
    assert all(t.device == ids.device for layer in cache.layers for t in layer.entries.fields.values())


def test_expected_attention_makes_no_tensor_off_the_inputs_device(strict_device):
    """Under ``strict_device`` a tensor created without an explicit device lands on meta and mixing it
    with the inputs fails: the scoring (rotation averages included) makes every tensor on the inputs' device."""
    layer, ctx = _context("expected_attention:budget=20,future=16", "dca:chunk_size=14,local_window=4")
    with strict_device():
        scores = layer.policy.scores(ctx)
        layer.compress(ctx)
    assert scores.device == ctx.q.device and layer.entries.fields["keys"].device == ctx.q.device
