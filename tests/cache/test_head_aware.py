"""Head-aware cache policies (``duo``, ``razor``): per-head kept sets against a naive reference, the
identity settings against ``full`` / ``streaming``, RazorAttention's compensation token against eq. 4-5
written out in float64, freed memory, the head-score procedures and their score files."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import longlab
from longlab.attention.kernel import segmented_attention
from longlab.bridge import heads
from longlab.cache.heads import head_aware_keep
from longlab.cache.layer import LonglabLayer
from longlab.cache.policies.duo import Duo
from longlab.cache.policies.razor import Razor
from longlab.cache.policy import Scoring
from longlab.data.synthetic import passkey
from longlab.generation import encode
from longlab.positions import FrequencyTable
from longlab.positions.rope import base_inv_freq
from support.models import build
from support.reference import inv_freq, rotate_pairwise

D = 16
SCALE = D**-0.5


@pytest.fixture(scope="module")
def tiny():
    return longlab.load("tiny")


@pytest.fixture(scope="module")
def score_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("heads")


def _naive_keep(positions, valid, retrieval, sinks, recent):
    """Per (row, head), written plainly: a retrieval head keeps every real token; another keeps the
    first ``sinks`` real tokens by position and the ``recent`` latest of the rest."""
    keep = torch.zeros_like(valid)
    for b in range(valid.shape[0]):
        for h in range(valid.shape[1]):
            real = [(int(positions[b, h, i]), i) for i in range(valid.shape[2]) if valid[b, h, i]]
            if retrieval[h]:
                chosen = [i for _, i in real]
            else:
                ordered = sorted(real)
                chosen = [i for _, i in ordered[:sinks]] + [i for _, i in ordered[sinks:][-recent:]]
            keep[b, h, chosen] = True
    return keep


@pytest.mark.parametrize("sinks,recent", [(0, 5), (3, 7), (4, 60)])
def test_per_head_masks_match_the_naive_reference(sinks, recent):
    gen = torch.Generator().manual_seed(1)
    b, hk, n = 3, 4, 40
    positions = torch.arange(n).repeat(b, hk, 1) + torch.randint(0, 5, (b, hk, 1), generator=gen)
    valid = torch.rand(b, hk, n, generator=gen) > 0.2  # padding and holes
    retrieval = torch.tensor([True, False, False, True])
    ours = head_aware_keep(positions, valid, retrieval, sinks, recent)
    assert torch.equal(ours, _naive_keep(positions, valid, retrieval, sinks, recent))


def test_policy_math_runs_on_the_meta_device():
    """The kept-set math creates every tensor on its inputs' device (meta: no data, shapes only)."""
    positions = torch.arange(32, device="meta").repeat(2, 4, 1)
    valid = torch.ones(2, 4, 32, dtype=torch.bool, device="meta")
    keep = head_aware_keep(positions, valid, torch.tensor([True, False, True, False], device="meta"), 4, 8)
    assert keep.device.type == "meta" and keep.shape == (2, 4, 32)
    policy = Razor(buffer=8).with_retrieval(torch.tensor([[True, False]])).for_layer(0)
    assert policy.held_budget(torch.tensor([100, 3], device="meta")).device.type == "meta"


def _heads(table: list[list[bool]]) -> torch.Tensor:
    return torch.tensor(table, dtype=torch.bool)


def _logits(model, policy, ids: torch.Tensor, steps: list[int]) -> torch.Tensor:
    """Logits of a prefill of ``ids`` and of decoding ``steps`` one token at a time, under ``policy``."""
    longlab.apply(model, policy)
    cache = DynamicCache()
    with torch.no_grad():
        out = [model(ids, past_key_values=cache, use_cache=True).logits[:, -1]]
        for token in steps:
            out.append(model(torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits[:, -1])
    return torch.stack(out)


def test_identity_settings_equal_full_and_streaming(tiny):
    """All heads retrieval: ``duo`` and ``razor`` equal ``full``; all heads streaming: ``duo`` equals
    ``streaming`` with the same sinks and window — prefill and decoding, through the bundled model."""
    model, _ = tiny
    ids = torch.randint(10, 8000, (1, 300), generator=torch.Generator().manual_seed(0))
    steps = [17, 523, 1001, 42, 77, 9]
    full = _logits(model, "full", ids, steps)
    streaming = _logits(model, "streaming:sinks=4,window=64", ids, steps)
    everything, nothing = torch.ones(6, 4, dtype=torch.bool), torch.zeros(6, 4, dtype=torch.bool)
    duo = Duo(sink=4, recent=64)
    assert torch.equal(_logits(model, duo.with_retrieval(everything), ids, steps), full)
    assert torch.equal(_logits(model, duo.with_retrieval(nothing), ids, steps), streaming)
    assert torch.equal(_logits(model, Razor(buffer=16).with_retrieval(everything), ids, steps), full)
    assert not torch.allclose(streaming[1:], full[1:])  # eviction changed the decoding: the test can fail
    # mixed heads lie in between; the sparsity knob picks the table from scores
    mixed = duo.from_scores(torch.arange(24.0).view(6, 4))
    assert mixed.retrieval.sum() == 12 and bool(mixed.retrieval.flatten()[12:].all())
    assert Duo(sparsity=1.0).from_scores(torch.zeros(6, 4)).retrieval.sum() == 0


def test_streaming_heads_free_their_memory(tiny):
    """cache_stats counts exactly what each head holds; the freed entries are gone from the tensors."""
    model, _ = tiny
    table = _heads([[True, False, False, True]] * 6)
    longlab.apply(model, Duo(sink=4, recent=60).with_retrieval(table))
    cache = DynamicCache()
    with torch.no_grad():
        model(torch.randint(10, 8000, (1, 300)), past_key_values=cache, use_cache=True)
    stats = longlab.cache_stats(cache)
    per_entry = 2 * 32 * 4 + 4  # key and value in float32, one int32 position
    for layer, layer_stats in zip(cache.layers, stats.layers, strict=True):
        assert layer_stats.tokens == [[300, 64, 64, 300]]
        assert layer.entries.fields["keys"].shape[0] == 728  # packed, not padded
        assert layer_stats.bytes_held == 728 * per_entry
    assert stats.bytes_held / stats.bytes_full == pytest.approx(728 * per_entry / (1200 * 2 * 32 * 4))


def _layer_call(layer: LonglabLayer, q, k, v, positions, table) -> torch.Tensor:
    segments = longlab.parse("none")[0].segments()
    valid = torch.ones(positions.shape, dtype=torch.bool)

    def attend(q, k, v, q_pos, k_pos, key_valid):
        return segmented_attention(q, k, v, q_pos, k_pos, segments, table, SCALE, key_valid)

    scoring = Scoring(segments, lambda length: table, SCALE, 0, 1)
    return layer.attend(q, k, v, positions, valid, attend, scoring)


def _rotated(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x (T, d) rotated to absolute positions (T,): RoPE written pair by pair."""
    return rotate_pairwise(x[None, None], positions[:, None], inv_freq(D))[0, 0, :, 0]


def test_razor_compensation_token_equals_equations_4_and_5():
    """One retrieval and one local KV head: the local head keeps sinks + buffer + one compensation token
    whose key is the mean of the dropped keys *rotated at their positions* and whose value is the mean
    of the dropped values, counted n times in the softmax. Checked over two evictions (the token
    absorbs newly dropped ones) against the equations written out in float64."""
    gen = torch.Generator().manual_seed(0)
    n, new, g = 48, 5, 2
    k, v = (torch.randn(1, 2, n + new, D, generator=gen, dtype=torch.float64) for _ in range(2))
    q = torch.randn(1, 2 * g, n + new, D, generator=gen, dtype=torch.float64)
    policy = Razor(sinks=2, buffer=8, compression=1000.0).with_retrieval(_heads([[True, False]])).for_layer(0)
    layer = LonglabLayer(policy)
    table = FrequencyTable(base_inv_freq(D, 10000.0))
    positions = torch.arange(n + new)[None]
    _layer_call(layer, q[:, :, :n], k[:, :, :n], v[:, :, :n], positions[:, :n], table)
    assert layer.entries.counts().tolist() == [[n, 2 + 1 + 8]]
    out = _layer_call(layer, q[:, :, n:], k[:, :, n:], v[:, :, n:], positions[:, n:], table)
    assert layer.entries.counts().tolist() == [[n + new, 2 + 1 + 8]]

    def expected(query: int, head: int, dropped: range) -> torch.Tensor:
        """Eq. 5 for KV head 1: kept keys, plus the compensation token of ``dropped`` counted len(dropped) times."""
        kept = [j for j in range(query + 1) if j < 2 or j > dropped[-1]]
        keys = _rotated(k[0, 1, kept], torch.tensor(kept))
        mean_key = _rotated(k[0, 1, list(dropped)], torch.tensor(list(dropped))).mean(0)
        qr = _rotated(q[0, head, query][None], torch.tensor([query]))[0]
        logits = torch.cat((keys @ qr, (mean_key @ qr)[None])) * SCALE
        logits[-1] += math.log(len(dropped))
        values = torch.cat((v[0, 1, kept], v[0, 1, list(dropped)].mean(0)[None]))
        return torch.softmax(logits, 0) @ values

    for t in range(new):
        for head in (2, 3):  # the query heads of KV head 1
            # the correction's probabilities are float32 (longlab.cache.scores), hence 1e-6
            torch.testing.assert_close(out[0, head, t], expected(n + t, head, range(2, n - 8)), atol=1e-6, rtol=0)
    # the second eviction merged positions 40..44 into the token: it is now the mean of 2..44
    count = layer.entries.dense("count")[0, 1]
    held = layer.entries.dense("positions")[0, 1]
    slot = int((count > 1).nonzero())
    assert int(held[slot]) == n + new - 9 and int(count[slot]) == n + new - 8 - 2
    dropped = torch.arange(2, n + new - 8)
    mean_key = _rotated(k[0, 1, dropped], dropped).mean(0)
    stored = _rotated(layer.entries.dense("keys")[0, 1, slot][None], held[slot : slot + 1].long())[0]
    torch.testing.assert_close(stored, mean_key, atol=1e-7, rtol=0)  # float32 frequency table
    torch.testing.assert_close(layer.entries.dense("values")[0, 1, slot], v[0, 1, dropped].mean(0), atol=1e-12, rtol=0)


def test_duo_scores_are_the_passkey_loss_rise_and_are_reused(tiny, score_dir, monkeypatch):
    """The measured score of a head equals the answer's loss rise computed plainly (the whole prompt
    through ``apply`` with only that head streaming); the second apply reads the file instead."""
    model, tokenizer = tiny
    spec = f"duo:samples=1,probe=128,sparsity=0.25,scores={score_dir}"
    longlab.apply(model, spec)
    files = list(score_dir.glob("passkey_loss-*.json"))
    assert len(files) == 1
    stored = json.loads(files[0].read_text())
    assert stored["parameters"] == {"samples": 1, "probe": 128, "seed": 0, "sink": 8, "recent": 32}
    scores = torch.tensor(stored["scores"])
    assert longlab.bridge.patch_of(model).cache.retrieval.sum() == 18  # 6 of 24 heads streaming

    sample = passkey(tokenizer, 128, random.Random(0))
    ids = encode(tokenizer, sample.prompt)
    answer = tokenizer(" " + sample.answers[0], add_special_tokens=False, return_tensors="pt").input_ids

    def loss(retrieval: torch.Tensor) -> float:
        longlab.apply(model, Duo(sink=8, recent=32).with_retrieval(retrieval))
        cache = DynamicCache()
        with torch.no_grad():
            model(ids[:, :-8], past_key_values=cache, use_cache=True)
            logits = model(torch.cat((ids[:, -8:], answer), 1), past_key_values=cache, use_cache=True).logits
        return float(torch.nn.functional.cross_entropy(logits[0, 7:-1].double(), answer[0]))

    everything = torch.ones(6, 4, dtype=torch.bool)
    layer, head = divmod(int(scores.abs().argmax()), 4)  # the head whose score matters most
    alone = everything.clone()
    alone[layer, head] = False
    assert scores[layer, head] == pytest.approx(loss(alone) - loss(everything), abs=1e-9)

    monkeypatch.setattr(heads, "passkey_loss", lambda *a: pytest.fail("scores measured again"))
    longlab.apply(model, spec)
    assert len(list(score_dir.glob("passkey_loss-*.json"))) == 1


def test_razor_scores_are_echo_and_induction_attention(tiny, score_dir):
    """Echo and induction scores equal the unpatched model's own eager attention weights on the same
    repeated sequence, read off per query heads and averaged per KV head."""
    model, _ = tiny
    longlab.apply(model, f"razor:probe=64,scores={score_dir}")
    stored = json.loads(next(score_dir.glob("echo_induction-*.json")).read_text())
    scores = torch.tensor(stored["scores"], dtype=torch.float64)
    retrieval = longlab.bridge.patch_of(model).cache.retrieval
    assert retrieval.sum() <= 1 + 4 and retrieval.flatten()[int(scores[1].argmax())]  # ceil(.01*24) + ceil(.14*24)
    longlab.reset(model)
    path = longlab.model_path("tiny")
    eager = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    allowed = torch.tensor([t for t in range(8192) if t not in (0, 1)])
    tokens = allowed[torch.randint(len(allowed), (32,), generator=gen)]
    with torch.no_grad():
        attentions = eager(torch.cat((tokens, tokens))[None], output_attentions=True).attentions
    for layer in range(6):
        for kv in range(4):
            echo = induction = 0.0
            for h in (2 * kv, 2 * kv + 1):
                for i in range(32, 63):
                    echo += float(attentions[layer][0, h, i, i - 32]) / 62
                    induction += float(attentions[layer][0, h, i, i - 31]) / 62
            assert scores[0, layer, kv] == pytest.approx(echo, abs=1e-5)
            assert scores[1, layer, kv] == pytest.approx(induction, abs=1e-5)


def test_dca_plus_duo_composes_and_generates(tiny, score_dir):
    model, tokenizer = tiny
    methods = longlab.parse(f"dca+duo:samples=1,probe=128,sparsity=0.25,scores={score_dir}")
    assert [m.kind for m in methods] == ["position", "cache"]
    longlab.apply(model, methods)
    assert "dca" in longlab.describe(model) and "duo" in longlab.describe(model)
    ids = encode(tokenizer, passkey(tokenizer, 1024, random.Random(3)).prompt)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4
    kept = {t for layer in longlab.cache_stats(model).layers for t in layer.tokens[0]}
    assert min(kept) == 64 + 256 and max(kept) == ids.shape[1] + 3  # streaming heads vs retrieval heads


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("duo:sparsity=1.5", r"'sparsity' must be a number >= 0 and <= 1, got 1.5"),
        ("duo:recent=0", r"'recent' must be an integer >= 1"),
        ("duo:samples=0", r"'samples' must be an integer >= 1"),
        ("duo:probe=10", r"'probe' must be an integer >= 64"),
        ("razor:echo=-0.1", r"'echo' must be a number >= 0 and <= 1"),
        ("razor:compression=0.5", r"'compression' must be a finite number >= 1, got 0.5"),
        ("razor:probe=65", r"'probe' must be even"),
        ("razor:buffer=0", r"'buffer' must be an integer >= 1"),
    ],
)
def test_bad_parameters_name_the_parameter_and_range(spec, message):
    with pytest.raises(longlab.SpecError, match=message):
        longlab.parse(spec)


def test_an_unprepared_policy_says_how_to_install_it():
    with pytest.raises(longlab.LonglabError, match=r"longlab.apply\(model, 'duo"):
        Duo().for_layer(0)


@pytest.mark.parametrize("policy", [Duo(sink=2, recent=20), Razor(sinks=2, buffer=20, chunk=32)], ids=["duo", "razor"])
def test_head_aware_caches_stay_on_the_inputs_device(strict_device, device, policy):
    """Prefill, eviction, compensation and decoding of a padded batch under ``strict_device``: no tensor
    made off the inputs' device, every stored tensor on it."""
    model = longlab.apply(build().to(device), policy.with_retrieval(_heads([[True, False], [False, True]])))
    ids = torch.randint(3, 128, (2, 150), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :37] = 0
    cache = DynamicCache()
    with strict_device(), torch.no_grad():
        tokens = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=4, min_new_tokens=4,
                                do_sample=False)  # fmt: skip
    assert tokens.shape == (2, 154)
    for layer in cache.layers:
        assert all(t.device == ids.device for t in layer.entries.fields.values())
        assert layer.entries.counts().max() > layer.entries.counts().min()  # heads hold different counts
