"""Batch reordering of longlab's cache layers (beam search, contrastive search): every row's entries,
per-entry policy scores (H2O), quantized blocks and residual, and count of real tokens move with the
row, for every cache policy."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import longlab
from longlab.cache.entries import Entries
from longlab.cache.layer import LonglabLayer
from support.models import build

POLICIES = [
    "full", "window:budget=12", "streaming:sinks=2,window=10", "snapkv:budget=12,window=4",
    "h2o:budget=12", "tova:budget=12", "pyramidkv:budget=12,window=4", "adakv:budget=12,window=4",
    "knorm:budget=12", "random:budget=12", "kv_int8:residual=4", "kv_int4:residual=4,group=8",
]  # fmt: skip
REORDER = [2, 0, 2]  # repeats and drops a row, as beam search does


def _inputs(batch=3, length=20, steps=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, : 3 * row] = 0  # each row its own left padding, so rows hold different tokens
    tokens = torch.randint(3, 128, (batch, steps), generator=g)
    return ids.masked_fill(mask == 0, 0), mask, tokens


def _decode(model, cache, mask, tokens):
    """Feed ``tokens`` one step at a time; returns the last step's logits and the grown mask."""
    out = None
    for t in range(tokens.shape[1]):
        mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
        out = model(tokens[:, t : t + 1], attention_mask=mask, past_key_values=cache, use_cache=True)
    return out.logits[:, -1], mask


def _rows(layer: LonglabLayer) -> list[list[dict[str, torch.Tensor]]]:
    """Per batch row, per KV head: every field of the entries it holds (dequantized for quantized caches)."""
    entries = layer.entries
    names = list(entries.fields) if isinstance(entries, Entries) else ["keys", "values", "positions"]
    counts = entries.counts().tolist()
    dense = {name: entries.dense(name) for name in names}
    return [
        [{name: dense[name][b, h, dense[name].shape[2] - n :] for name in names} for h, n in enumerate(row)]
        for b, row in enumerate(counts)
    ]


def _snapshot(cache):
    return [(_rows(layer), layer.valid_seen.clone(), layer.seen) for layer in cache.layers]


def _assert_rows(after, before, order):
    for (rows, valid_seen, seen), (old_rows, old_valid, old_seen) in zip(after, before, strict=True):
        assert seen == old_seen
        assert torch.equal(valid_seen, old_valid[order])
        assert len(rows) == len(order)
        for row, source in zip(rows, order, strict=True):
            for head, old_head in zip(row, old_rows[source], strict=True):
                for name, value in head.items():
                    torch.testing.assert_close(value, old_head[name], atol=0, rtol=0)


def _prefilled(spec, ids, mask, tokens):
    model = build()
    longlab.apply(model, spec)
    cache = DynamicCache()
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        _, mask = _decode(model, cache, mask, tokens)
    assert len(cache.layers) == 2 and all(isinstance(layer, LonglabLayer) for layer in cache.layers)
    return model, cache, mask


@pytest.mark.parametrize("spec", POLICIES)
def test_reorder_cache_moves_every_row_with_its_state(spec):
    ids, mask, tokens = _inputs()
    _, cache, _ = _prefilled(spec, ids, mask, tokens)
    before = _snapshot(cache)
    if spec.startswith("adakv"):  # heads hold different counts: the packed path
        assert any(not layer.entries.equal for layer in cache.layers)
    cache.reorder_cache(torch.tensor(REORDER))
    _assert_rows(_snapshot(cache), before, REORDER)


@pytest.mark.parametrize("spec", ["h2o:budget=12", "adakv:budget=12,window=4", "kv_int4:residual=4,group=8"])
def test_batch_repeat_interleave_and_select_indices(spec):
    """Contrastive search repeats every row top_k times, then keeps the chosen candidate of each."""
    ids, mask, tokens = _inputs()
    _, cache, _ = _prefilled(spec, ids, mask, tokens)
    before = _snapshot(cache)
    cache.batch_repeat_interleave(2)
    _assert_rows(_snapshot(cache), before, [0, 0, 1, 1, 2, 2])
    cache.batch_select_indices(torch.tensor([1, 2, 5]))  # a CPU index, as contrastive search passes
    _assert_rows(_snapshot(cache), before, [0, 1, 2])


@pytest.mark.parametrize("spec", [p for p in POLICIES if not p.startswith("random")])
def test_decoding_after_a_reorder_equals_a_batch_that_was_always_in_that_order(spec):
    """Reorder after a few decoding steps, decode on: logits and what each row holds equal those of a
    batch built in the new order from the start (eviction is per row; ``random`` draws per row index
    and is covered by the exact move above)."""
    ids, mask, tokens = _inputs()
    more = torch.randint(3, 128, (len(REORDER), 5), generator=torch.Generator().manual_seed(1))
    model, cache, grown = _prefilled(spec, ids, mask, tokens)
    order = torch.tensor(REORDER)
    cache.reorder_cache(order)
    with torch.no_grad():
        got, _ = _decode(model, cache, grown[order], more)
    _, expected_cache, expected_mask = _prefilled(spec, ids[order], mask[order], tokens[order])
    with torch.no_grad():
        expected, _ = _decode(model, expected_cache, expected_mask, more)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    for layer, reference in zip(cache.layers, expected_cache.layers, strict=True):
        assert torch.equal(layer.entries.counts(), reference.entries.counts())
        assert torch.equal(layer.entries.dense("positions"), reference.entries.dense("positions"))
        assert torch.equal(layer.valid_seen, reference.valid_seen)


def test_reordering_an_empty_cache_is_a_no_op():
    layer = LonglabLayer(None)
    layer.reorder_cache(torch.tensor([0, 0]))
    layer.batch_repeat_interleave(3)
    assert layer.entries is None


def test_crop_is_refused_with_what_works():
    ids, mask, tokens = _inputs(steps=1)
    _, cache, _ = _prefilled("full", ids, mask, tokens)
    with pytest.raises(longlab.LonglabError, match=r"cannot be cropped.*beam search"):
        cache.crop(-1)
