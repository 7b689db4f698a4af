"""apply / reset / describe on real transformers models: forward, generate, padding, training."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

import longlab
from support.models import L_TRAIN, build


def _ids(batch=2, length=50, seed=0):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("length", [31, 150])
def test_none_equals_unpatched_logits(family, length):
    model = build(family)
    ids = _ids(length=length)
    before = _logits(model, ids)
    longlab.apply(model, "none")
    torch.testing.assert_close(_logits(model, ids), before, atol=1e-4, rtol=0)


def test_sliding_window_layers_keep_their_window():
    model = build("mistral", sliding_window=24)
    ids = _ids(length=90)
    before = _logits(model, ids)
    longlab.apply(model, "none")
    torch.testing.assert_close(_logits(model, ids), before, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_none_greedy_generation_identical(family):
    model = build(family)
    ids = _ids(batch=1, length=20)
    expected = model.generate(ids, max_new_tokens=40, do_sample=False)
    longlab.apply(model, "none")
    assert torch.equal(model.generate(ids, max_new_tokens=40, do_sample=False), expected)


def test_none_sampling_identical_under_same_seed():
    model = build()
    ids = _ids(batch=2, length=12)
    torch.manual_seed(7)
    expected = model.generate(ids, max_new_tokens=25, do_sample=True, top_k=20)
    longlab.apply(model, "none")
    torch.manual_seed(7)
    assert torch.equal(model.generate(ids, max_new_tokens=25, do_sample=True, top_k=20), expected)


def test_left_padded_batch_generation_identical():
    model = build()
    ids = _ids(batch=3, length=30)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    mask[2, :17] = 0
    ids = ids.masked_fill(mask == 0, 0)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    longlab.apply(model, "none")
    got = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    assert torch.equal(got, expected)


def test_training_gradients_equal_unpatched():
    model = build()
    model.train()
    ids = _ids(length=80)
    model(ids, labels=ids).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    longlab.apply(model, "none")
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], atol=1e-4, rtol=1e-3, msg=name)


IDENTITIES = [
    "rerope:window=200",
    "selfextend:group=4,window=200",
    "leaky_rerope:window=10,k=1",
    "power:power=0",
    "lm_infinite:band=200",
    "sliding:size=200",
    "truncation:low=0,high=0.0001",
    "dynamic_ntk",
    "dynamic_yarn",
    "string:shift=0",
    "string:shift=50,window=50",
    "dca:chunk_size=200,local_window=30",
]


@pytest.mark.parametrize("spec", IDENTITIES)
def test_identity_settings_equal_none(spec):
    """Each method at its identity settings equals plain RoPE (length 150 < every window here)."""
    model = build()
    ids = _ids(length=150 if "dynamic" not in spec else L_TRAIN)
    expected = _logits(longlab.apply(model, "none"), ids)
    torch.testing.assert_close(_logits(longlab.apply(model, spec), ids), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "spec",
    ["rerope:window=20", "selfextend:group=3,window=16", "lm_infinite:band=32,n_global=4", "sliding:size=40",
     "string:shift=30,window=4", "dca:chunk_size=40,local_window=8"],
)  # fmt: skip
def test_remaps_change_logits_past_their_window(spec):
    model = build()
    ids = _ids(length=150)
    plain = _logits(longlab.apply(model, "none"), ids)
    assert (_logits(longlab.apply(model, spec), ids) - plain).abs().max() > 1e-3


@pytest.mark.parametrize(
    "spec",
    ["none", "rerope:window=20", "leaky_rerope:window=16,k=3", "selfextend:group=3,window=16",
     "lm_infinite:band=32,n_global=4", "dynamic_ntk:factor=2", "dynamic_yarn", "longrope:factor=4",
     "yarn:factor=4+logn", "string:shift=30,window=4", "dca:chunk_size=24,local_window=4"],
)  # fmt: skip
def test_incremental_decoding_equals_full_recompute(spec):
    """Cached unrotated keys + positions give the same next-token logits as recomputing everything.

    Methods whose frequencies change with length (dynamic_*, longrope past L) re-rotate every cached
    key at each step; that is exact for one layer. Deeper layers' cached keys come from hidden states
    computed under the earlier frequencies, as in any cache, so those methods are checked on one layer.
    """
    changes_with_length = spec.startswith(("dynamic", "longrope"))
    model = build(num_hidden_layers=1 if changes_with_length else 2).double()  # float64: exact
    longlab.apply(model, spec)
    ids = _ids(batch=2, length=L_TRAIN + 30)
    cache = DynamicCache()
    with torch.no_grad():
        model(ids[:, :40], past_key_values=cache, use_cache=True)
        model(ids[:, 40:70], past_key_values=cache, use_cache=True)  # a chunk
        for t in range(70, ids.shape[1]):
            step = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1]
            full = model(ids[:, : t + 1]).logits[:, -1]
            torch.testing.assert_close(step, full, atol=1e-9, rtol=1e-9)


def test_logn_is_identity_within_training_length_and_scales_beyond():
    model = build()
    short, long = _ids(length=L_TRAIN), _ids(length=3 * L_TRAIN)
    yarn_short, yarn_long = (_logits(longlab.apply(model, "yarn:factor=4"), x) for x in (short, long))
    longlab.apply(model, "yarn:factor=4+logn")
    torch.testing.assert_close(_logits(model, short), yarn_short, atol=1e-5, rtol=0)
    assert (_logits(model, long) - yarn_long).abs().max() > 1e-3


def test_describe_reset_and_reapply():
    model = build()
    ids = _ids(length=100)
    plain = _logits(model, ids)
    longlab.apply(model, "selfextend", group=8, window=16)
    text = longlab.describe(model)
    assert "selfextend:group=8,window=16" in text and "L_train=64" in text
    longlab.apply(model, "yarn:factor=4+logn")
    assert [m.name for m in longlab.active_methods(model)] == ["yarn", "logn"]
    longlab.reset(model)
    assert not longlab.is_applied(model) and "not applied" in longlab.describe(model)
    assert model.config._attn_implementation != "longlab"
    torch.testing.assert_close(_logits(model, ids), plain, atol=0, rtol=0)


def test_methods_lists_every_method_with_kind_and_parameters():
    table = {m["name"]: m for m in longlab.methods()}
    expected = {
        "none", "linear", "ntk", "dynamic_ntk", "yarn", "dynamic_yarn", "llama3", "longrope", "power",
        "truncation", "rerope", "leaky_rerope", "selfextend", "lm_infinite", "sliding", "logn", "string", "dca",
    }  # fmt: skip
    assert expected <= set(table)
    assert table["logn"]["kind"] == "scaling" and table["yarn"]["kind"] == "position"
    assert table["yarn"]["parameters"]["factor"]["default"] == "required"
    assert table["selfextend"]["parameters"]["window"]["default"] == "from model"
    assert all(m["summary"] for m in table.values())


def test_unsupported_architecture_names_supported_families():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(longlab.UnsupportedModelError, match=r"gpt2.*llama, mistral, qwen2, qwen3"):
        longlab.apply(gpt2, "none")


def test_attention_dropout_is_refused():
    with pytest.raises(longlab.UnsupportedModelError, match="attention_dropout"):
        longlab.apply(build(attention_dropout=0.1), "none")


def test_static_cache_is_refused_with_advice():
    model = longlab.apply(build(), "none")
    with pytest.raises(longlab.LonglabError, match="DynamicCache"):
        model.generate(_ids(batch=1, length=5), max_new_tokens=3, cache_implementation="static")
