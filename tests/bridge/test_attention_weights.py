"""``output_attentions=True`` after ``longlab.apply``: the unpatched model's eager attentions for
``none``, the dense softmax of each method's logits otherwise, the entries a cache held for a
compressed cache, and a clear refusal where the weights cannot be given."""

from __future__ import annotations

import math

import pytest
import torch

import longlab
from longlab.bridge import patch_of
from support import reference
from support.models import L_TRAIN, build


def _ids(batch=2, length=40, seed=0):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _padded(batch=2, length=40):
    ids = _ids(batch, length)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("family,overrides", [("llama", {}), ("qwen3", {}), ("mistral", {"sliding_window": 24})])
@pytest.mark.parametrize("use_cache", [False, True])
def test_none_returns_the_unpatched_eager_attentions(family, overrides, use_cache):
    model = build(family, attn_implementation="eager", **overrides)
    ids, mask = _padded()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, output_attentions=True).attentions
        longlab.apply(model, "none")
        got = model(ids, attention_mask=mask, output_attentions=True, use_cache=use_cache).attentions
    assert len(got) == len(expected) == model.config.num_hidden_layers
    for layer, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.shape == e.shape and g.dtype == e.dtype, layer
        torch.testing.assert_close(g[0], e[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(g[1, :, 9:], e[1, :, 9:], atol=1e-5, rtol=0)  # real queries of the padded row


def test_none_generate_returns_every_steps_eager_attentions():
    model = build(attn_implementation="eager")
    ids = _ids(batch=1, length=20)
    kwargs = dict(max_new_tokens=5, do_sample=False, output_attentions=True, return_dict_in_generate=True)
    expected = model.generate(ids, **kwargs)
    longlab.apply(model, "none")
    got = model.generate(ids, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    for step_got, step_expected in zip(got.attentions, expected.attentions, strict=True):
        for g, e in zip(step_got, step_expected, strict=True):
            torch.testing.assert_close(g, e, atol=1e-5, rtol=0)


# position methods whose logits the naive reference writes pair by pair from the paper's formula
REMAPS = [
    ("rerope:window=20", "rerope", {"window": 20}),
    ("leaky_rerope:window=16,k=3", "leaky_rerope", {"window": 16, "k": 3}),
    ("selfextend:group=3,window=16", "selfextend", {"group": 3, "window": 16}),
    ("lm_infinite:band=32,n_global=4", "lm_infinite", {"band": 32, "n_global": 4, "original_length": L_TRAIN}),
    ("sliding:size=40", "sliding", {"size": 40}),
    ("yarn:factor=4+logn", "frequency", {}),
]


@pytest.mark.parametrize("spec,name,params", REMAPS, ids=[r[0] for r in REMAPS])
def test_methods_return_the_dense_softmax_of_their_logits(spec, name, params):
    """Layer 0's weights against a float64 softmax of the method's logits computed pair by pair
    (support/reference.py), past the training length so every method differs from plain RoPE."""
    model = build()
    length = 150
    ids = _ids(batch=1, length=length)
    longlab.apply(model, spec)
    with torch.no_grad():
        got = model(ids, output_attentions=True, use_cache=False).attentions[0]
        attention = model.model.layers[0].self_attn
        hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        q = attention.q_proj(hidden).view(1, length, -1, 16).transpose(1, 2).double()
        k = attention.k_proj(hidden).view(1, length, -1, 16).transpose(1, 2).double()
    positions = torch.arange(length)
    table = patch_of(model).table(length)
    if "logn" in spec:
        q = q * (torch.log(positions.double() + 1) / math.log(L_TRAIN)).clamp(min=1)[None, None, :, None]
    visible, rel = reference.distances(name, positions, positions, **params)
    rotated = reference.rotate_pairwise(q, rel, table.inv_freq.double(), factor=table.attention_factor)
    keys = k.repeat_interleave(q.shape[1] // k.shape[1], 1) * table.attention_factor
    logits = torch.einsum("bhqkd,bhkd->bhqk", rotated, keys) * attention.scaling
    expected = torch.softmax(logits.masked_fill(~visible, -math.inf), dim=-1)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "spec", ["snapkv:budget=12,window=4", "adakv:budget=12,window=4", "streaming:sinks=2,window=10"]
)
def test_compressed_caches_return_weights_over_the_entries_held(spec):
    """The prompt attends before any eviction (its weights are those of ``none``); each decoding step
    attends over what the cache held, so its row has one column per held entry and sums to 1."""
    model = build()
    ids = _ids(batch=2, length=30)
    with torch.no_grad():
        longlab.apply(model, "none")
        plain = model(ids, output_attentions=True).attentions
        longlab.apply(model, spec)
        kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_attentions=True)
        out = model.generate(ids, return_dict_in_generate=True, **kwargs)
    assert len(out.attentions) == 4 and all(len(step) == len(plain) == 2 for step in out.attentions)
    for g, e in zip(out.attentions[0], plain, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0)
    for seen, step in enumerate(out.attentions[1:], start=31):
        for weights in step:
            assert weights.shape[:3] == (2, 4, 1) and weights.shape[3] < seen  # the evicted entries are gone
            torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 1), atol=1e-5, rtol=0)


def test_chunked_prefill_longer_than_one_chunk_is_refused_naming_what_works():
    model = build()
    longlab.apply(model, "snapkv:budget=16,window=4,chunk=10")
    with pytest.raises(
        longlab.LonglabError, match=r"output_attentions=True needs the whole input.*chunk=10.*at most 10"
    ):
        model(_ids(length=25), output_attentions=True)
    out = model(_ids(length=10), output_attentions=True)  # one chunk: fine, with gradients enabled too
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 4, 10, 10)


def test_sequence_parallel_model_is_refused_naming_what_works():
    model = build()
    longlab.apply(model, "none")
    patch_of(model).attend = lambda *args: None  # what longlab.parallel.shard installs
    with pytest.raises(longlab.LonglabError, match=r"output_attentions=True is not available.*sequence-parallel"):
        model(_ids(), output_attentions=True, use_cache=False)
