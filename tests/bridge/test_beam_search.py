"""Beam search after ``longlab.apply``: equal to the unpatched model for ``none``, and for every cache
policy each returned beam scores exactly what the same tokens score when run on their own (so each
beam kept its own cache rows, eviction state included, through every reordering)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import longlab
from support.models import build

NEW = 10


def _ids(batch=2, length=16, seed=0):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _beams(model, ids, **kwargs):
    return model.generate(
        ids, max_new_tokens=NEW, min_new_tokens=NEW, num_beams=3, num_return_sequences=3, do_sample=False,
        length_penalty=0.0, output_scores=True, return_dict_in_generate=True, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_none_beam_search_equals_unpatched(family):
    model = build(family)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    expected = _beams(model, ids.masked_fill(mask == 0, 0), attention_mask=mask)
    longlab.apply(model, "none")
    got = _beams(model, ids.masked_fill(mask == 0, 0), attention_mask=mask)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, atol=1e-5, rtol=0)


def _score_alone(model, prompt, generated):
    """Sum of log-probabilities of ``generated`` after ``prompt``, batch 1, fed as generate() feeds
    them (the prompt in one call, then one token per step), from a fresh cache."""
    cache = DynamicCache()
    total = 0.0
    with torch.no_grad():
        logits = model(prompt[None], past_key_values=cache, use_cache=True).logits[0, -1]
        for token in generated:
            total += torch.log_softmax(logits.float(), dim=-1)[token].item()
            logits = model(token.view(1, 1), past_key_values=cache, use_cache=True).logits[0, -1]
    return total


@pytest.mark.parametrize(
    "spec",
    [
        "full", "window:budget=12", "streaming:sinks=2,window=10", "snapkv:budget=12,window=4",
        "h2o:budget=12", "tova:budget=12", "pyramidkv:budget=12,window=4", "adakv:budget=12,window=4",
        "knorm:budget=12", "kv_int8:residual=4", "kv_int4:residual=4,group=8",
        "selfextend:group=2,window=8+h2o:budget=12",
    ],
)  # fmt: skip
def test_every_beam_scores_what_its_tokens_score_alone(spec):
    """With length_penalty=0 a beam's score is the sum of its tokens' log-probabilities. Rerunning each
    returned beam on its own (its own cache, evicting as generate() would) must give that score: a
    beam that read another beam's cache rows, or rows whose eviction state was not moved with them,
    scores differently. (``random`` draws per batch row index, so a beam alone evicts other tokens;
    its reordering is tested in tests/cache/test_beam.py.)"""
    model = build(eos_token_id=None)
    longlab.apply(model, spec)
    ids = _ids(batch=1, length=20)
    out = _beams(model, ids)
    assert out.sequences.shape == (3, 20 + NEW)
    assert longlab.cache_stats(model).seen == 20 + NEW - 1  # the beams decoded from longlab's cache
    for sequence, score in zip(out.sequences, out.sequences_scores, strict=True):
        alone = _score_alone(model, sequence[:20], sequence[20:])
        assert abs(alone - score.item()) < 1e-3, (spec, alone, score.item())
    assert len({tuple(s.tolist()) for s in out.sequences}) == 3  # distinct beams: the test can tell them apart


def test_random_eviction_beam_search_runs_and_holds_its_budget():
    model = build(eos_token_id=None)
    longlab.apply(model, "random:budget=12")
    out = _beams(model, _ids(batch=1, length=20))
    assert out.sequences.shape == (3, 20 + NEW)
    stats = longlab.cache_stats(model)
    assert max(t for layer in stats.layers for row in layer.tokens for t in row) <= 12
