"""Quest (query-aware sparse decoding) against naive references written from the paper.

The references below rotate keys and queries with plain cos/sin in float64, take each page's
channel-wise min and max with Python loops, and score pages with sum_i max(q_i m_i, q_i M_i)
(Tang et al., 2024, section 3.3) — none of longlab's pages, segments or kernel code is used.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

import longlab
import longlab.cache.policies
from longlab.attention.kernel import segmented_attention
from longlab.cache.layer import LonglabLayer
from longlab.cache.pages import PagedEntries, choose_pages, key_maps, page_bounds
from longlab.cache.policy import Scoring
from longlab.positions import FrequencyTable
from longlab.positions.rope import base_inv_freq
from support.models import build
from support.reference import attention, inv_freq

B, HK, D, N, PAGE = 2, 2, 16, 100, 8
SCALE = D**-0.5
TABLE = FrequencyTable(base_inv_freq(D, 10000.0))

# Each method as the paper writes it: a list of (admits(i, j), query position(i), key position(j)).
SE_G, SE_W = 4, 16  # SelfExtend (Jin et al. 2024, eq. 3-4)
DCA_S, DCA_W = 24, 4  # Dual Chunk Attention (An et al. 2024, section 3.2)
ST_S, ST_W = 40, 10  # STRING (An et al. 2024, section 4)
METHODS = {
    "none": ("none", [(lambda i, j: True, lambda i: i, lambda j: j)]),
    "selfextend": (
        f"selfextend:group={SE_G},window={SE_W}",
        [
            (lambda i, j: i - j < SE_W, lambda i: i, lambda j: j),
            (lambda i, j: i - j >= SE_W, lambda i: i // SE_G + SE_W - SE_W // SE_G, lambda j: j // SE_G),
        ],
    ),
    "dca": (
        f"dca:chunk_size={DCA_S},local_window={DCA_W}",
        [
            (lambda i, j: i // DCA_S == j // DCA_S, lambda i: i % DCA_S, lambda j: j % DCA_S),
            (lambda i, j: i // DCA_S - j // DCA_S == 1, lambda i: min(i % DCA_S + DCA_S, DCA_S + DCA_W),
             lambda j: j % DCA_S),
            (lambda i, j: i // DCA_S - j // DCA_S >= 2, lambda i: DCA_S + DCA_W, lambda j: j % DCA_S),
        ],
    ),
    "string": (
        f"string:shift={ST_S},window={ST_W}",
        [
            (lambda i, j: i - j < ST_S, lambda i: i, lambda j: j),
            (lambda i, j: i - j >= ST_S, lambda i: i - ST_S + ST_W, lambda j: j),
        ],
    ),
}  # fmt: skip


def _rot(x: torch.Tensor, position: float) -> torch.Tensor:
    """RoPE (rotate-half layout) of x (..., d) at one position, float64."""
    angles = position * inv_freq(D)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)


def _tensors(groups: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HK * groups, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, HK, N, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, HK, N, D, generator=gen, dtype=torch.float64)
    return q, k, v


def _segments(method: str):
    return longlab.parse(METHODS[method][0])[0].segments()


def _store(k: torch.Tensor, method: str, page: int = PAGE) -> PagedEntries:
    positions = torch.arange(N, dtype=torch.int32).expand(B, HK, N)
    store = PagedEntries.paged({"keys": k, "values": k, "positions": positions}, page)
    store.refresh(key_maps(_segments(method)), TABLE)
    return store


def _naive_bounds(q: torch.Tensor, k: torch.Tensor, method: str, query: int, page: int = PAGE) -> torch.Tensor:
    """(B, HK, pages): per page, the largest over the method's rules that admit one of its keys of
    sum over the query group of sum_i max(q_i m_i, q_i M_i), m and M the page's rotated key min / max."""
    rules = METHODS[method][1]
    groups = q.shape[1] // HK
    pages = math.ceil(N / page)
    out = torch.full((B, HK, pages), -math.inf, dtype=torch.float64)
    for b in range(B):
        for h in range(HK):
            for p in range(pages):
                members = range(p * page, min((p + 1) * page, N))
                for admits, q_at, k_at in rules:
                    if not any(admits(query, j) and j <= query for j in members):
                        continue
                    rotated = [_rot(k[b, h, j], k_at(j)) for j in members]
                    low = [min(float(r[c]) for r in rotated) for c in range(D)]
                    high = [max(float(r[c]) for r in rotated) for c in range(D)]
                    total = 0.0
                    for g in range(groups):
                        qr = _rot(q[b, h * groups + g], q_at(query))
                        total += sum(max(float(qr[c]) * low[c], float(qr[c]) * high[c]) for c in range(D))
                    out[b, h, p] = max(float(out[b, h, p]), total)
    return out


def _naive_choice(bounds: torch.Tensor, count: int) -> list[list[list[int]]]:
    """The ``count`` best pages of each (row, head), the newest page always among them, sorted."""
    chosen = []
    for b in range(B):
        row = []
        for h in range(HK):
            scores = bounds[b, h].tolist()
            newest = len(scores) - 1
            ranked = sorted((p for p in range(newest)), key=lambda p: -scores[p])
            row.append(sorted([newest, *ranked[: count - 1]]))
        chosen.append(row)
    return chosen


# -- the bound and the choice ---------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(METHODS))
def test_page_bound_is_at_least_every_logit_in_the_page(method):
    """Property: for random queries and keys, every admitted key's logit under the rule attention
    uses for it is at most its page's bound (one query head per KV head: the bound of that head)."""
    rules = METHODS[method][1]
    for seed in range(3):
        q, k, _ = _tensors(groups=1, seed=seed)
        store = _store(k, method)
        for query in (N - 1, N - 30):
            bounds = page_bounds(store, q, torch.full((B,), query), _segments(method), TABLE)
            for b in range(B):
                for h in range(HK):
                    for j in range(query + 1):
                        _, q_at, k_at = next(rule for rule in rules if rule[0](query, j))
                        logit = float(_rot(q[b, h], q_at(query)) @ _rot(k[b, h, j], k_at(j)))
                        assert logit <= float(bounds[b, h, j // PAGE]) + 1e-9, (method, seed, b, h, j)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_page_bounds_and_choice_equal_the_naive_reference(method):
    q, k, _ = _tensors(groups=2)
    store = _store(k, method)
    for query in (N - 1, N - 37):
        bounds = page_bounds(store, q, torch.full((B,), query), _segments(method), TABLE)
        naive = _naive_bounds(q, k, method, query)
        torch.testing.assert_close(bounds.double(), naive, rtol=1e-6, atol=1e-6)
        assert choose_pages(bounds, 4).tolist() == _naive_choice(naive, 4)


def test_page_bounds_are_updated_incrementally_as_tokens_arrive():
    """Appending token by token (a partial newest page recomputed each time) gives the same bounds as
    summarizing the whole cache at once, and never recomputes the full pages."""
    _, k, _ = _tensors(groups=1)
    maps = key_maps(_segments("selfextend"))
    positions = torch.arange(N, dtype=torch.int32).expand(B, HK, N)
    store = PagedEntries.paged({"keys": k[:, :, :40], "values": k[:, :, :40], "positions": positions[:, :, :40]}, PAGE)
    store.refresh(maps, TABLE)
    for t in range(40, N):
        full_pages = store.low[maps[0]][:, :, : t // PAGE].clone()
        new = slice(t, t + 1)
        store.append({"keys": k[:, :, new], "values": k[:, :, new], "positions": positions[:, :, new]})
        store.refresh(maps, TABLE)
        assert torch.equal(store.low[maps[0]][:, :, : t // PAGE], full_pages)  # untouched
    whole = _store(k, "selfextend")
    for key_map in maps:
        assert torch.equal(store.low[key_map], whole.low[key_map])
        assert torch.equal(store.high[key_map], whole.high[key_map])
    assert torch.equal(store.first, whole.first) and torch.equal(store.last, whole.last)


# -- attention over the chosen pages ----------------------------------------------------------------


def _decode_layer(spec: str, method: str, k, v, q):
    """Prefill N - 1 keys into a quest layer, then one decoding step (the N-th token) through
    ``LonglabLayer.attend``: returns the layer and the step's output (B, Hq, 1, d)."""
    segments = _segments(method)
    layer = LonglabLayer(longlab.parse(spec)[0])
    scoring = Scoring(segments, lambda length: TABLE, SCALE, layer_idx=0, n_layers=1)

    def attend(q, k, v, q_pos, k_pos, key_valid):
        return segmented_attention(q, k, v, q_pos, k_pos, segments, TABLE, SCALE, key_valid)

    prompt = torch.arange(N - 1).expand(B, N - 1)
    qs = torch.zeros(B, q.shape[1], N - 1, D, dtype=q.dtype)
    layer.attend(qs, k[:, :, :-1], v[:, :, :-1], prompt, torch.ones(B, N - 1, dtype=torch.bool), attend, scoring)
    step = torch.full((B, 1), N - 1)
    out = layer.attend(q[:, :, None], k[:, :, -1:], v[:, :, -1:], step, torch.ones(B, 1, dtype=torch.bool), attend,
                       scoring)  # fmt: skip
    return layer, out


@pytest.mark.parametrize("method", ["none", "selfextend", "dca"])
def test_decoding_attends_exactly_over_the_chosen_pages(method):
    """The decoding output equals naive softmax attention restricted to the naive reference's pages."""
    q, k, v = _tensors(groups=2)
    _, out = _decode_layer(f"quest:budget={4 * PAGE},page={PAGE},skip_layers=0", method, k, v, q)
    chosen = _naive_choice(_naive_bounds(q, k, method, N - 1), 4)
    rules = METHODS[method][1]
    rel = torch.tensor([[next(qa(N - 1) - ka(j) for a, qa, ka in rules if a(N - 1, j)) for j in range(N)]],
                       dtype=torch.float64)  # fmt: skip
    visible = torch.ones(1, N, dtype=torch.bool)
    for b in range(B):
        for h in range(HK):
            read = torch.zeros(1, N, dtype=torch.bool)
            for p in chosen[b][h]:
                read[0, p * PAGE : (p + 1) * PAGE] = True
            heads = slice(2 * h, 2 * h + 2)
            expected = attention(q[b : b + 1, heads, None], k[b : b + 1, h : h + 1], v[b : b + 1, h : h + 1], visible,
                                 rel, inv_freq(D), SCALE, key_valid=read)  # fmt: skip
            torch.testing.assert_close(out[b : b + 1, heads], expected, rtol=1e-6, atol=1e-7)


def test_prefill_and_skipped_layers_stay_dense():
    q, k, v = _tensors(groups=2)
    _, sparse = _decode_layer(f"quest:budget={4 * PAGE},page={PAGE},skip_layers=0", "none", k, v, q)
    layer, skipped = _decode_layer(f"quest:budget={4 * PAGE},page={PAGE},skip_layers=1", "none", k, v, q)
    _, full = _decode_layer("full", "none", k, v, q)
    assert torch.equal(skipped, full) and not torch.allclose(sparse, full)
    assert layer.entries.pages == 0  # a skipped layer keeps no page bounds


# -- through the bundled model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = longlab.load("tiny")
    return model, tokenizer


def _prompt(length: int) -> torch.Tensor:
    return torch.randint(3, 8000, (1, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("position", ["none", "dca", "string"])
def test_budget_covering_the_cache_equals_full_on_the_bundled_model(tiny, position):
    """Identity setting: with a budget of every token the logits of each decoding step equal ``full``'s."""
    model, _ = tiny
    ids = _prompt(300)
    logits = {}
    quest, chunked = "quest:budget=512,skip_layers=0", "quest:budget=512,page=7,skip_layers=0,chunk=128"
    specs = ("full", quest, "full:chunk=128", chunked)
    for cache in specs:
        longlab.apply(model, f"{position}+{cache}")
        out = model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
        logits[cache] = torch.stack(out.logits)
    longlab.reset(model)
    assert torch.equal(logits[specs[0]], logits[specs[1]])
    assert torch.equal(logits[specs[2]], logits[specs[3]])  # chunked prefill too


@pytest.mark.parametrize("position", ["dca", "string:shift=200,window=64"])
def test_quest_composes_with_dca_and_string_and_reads_only_the_budget(tiny, position):
    """``dca+quest`` and ``string+quest`` (with chunked prefill) decode with a budget below the cache:
    the statistics hold the full cache plus page bounds, and the last step read the chosen pages of the
    sparse layers, the dense layers whole, and the page bounds."""
    model, _ = tiny
    ids = _prompt(400)
    spec = f"{position}+quest:budget=64,page=16,chunk=128"
    longlab.apply(model, spec)
    cache = DynamicCache()
    model.generate(ids, cache=cache, max_new_tokens=5, do_sample=False)
    stats = longlab.cache_stats(model)
    longlab.reset(model)
    n = 404  # tokens seen: the last token is never fed back
    size = model.dtype.itemsize
    per_entry = 2 * 4 * 32 * size + 4 * 4  # keys + values (4 KV heads of 32 channels) + 4 int32 positions
    assert stats.seen == n
    pages = math.ceil(n / 16)
    for index, (layer, layer_stats) in enumerate(zip(cache.layers, stats.layers, strict=True)):
        assert layer_stats.tokens == [[n] * 4]  # nothing evicted
        if index < 2:  # the paper's default skip_layers=2: dense
            assert layer_stats.bytes_read == n * per_entry == layer_stats.bytes_held
        else:
            # one key map each (every DCA key at p mod s, every STRING key at p): a min and a max
            # vector, and the first and last position (int32), per page and KV head
            page_bytes = pages * 4 * (2 * 32 * size + 2 * 4)
            assert layer.entries.page_nbytes == page_bytes
            assert layer_stats.bytes_held == n * per_entry + page_bytes
            read = (3 * 16 + (n - (pages - 1) * 16)) * per_entry  # 3 full pages + the newest (partial) page
            assert layer_stats.bytes_read == read + page_bytes
    assert stats.bytes_read < stats.bytes_held


def test_bytes_read_of_a_dense_cache_are_what_it_holds():
    model = build("llama")
    longlab.apply(model, "full")
    model.generate(torch.randint(3, 128, (1, 60)), max_new_tokens=3, do_sample=False)
    stats = longlab.cache_stats(model)
    assert stats.bytes_read == stats.bytes_held and all(s.bytes_read == s.bytes_held for s in stats.layers)


# -- parameters and devices -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, message",
    [
        ("quest", "'budget' .* is required"),
        ("quest:budget=0", "'budget' must be an integer >= 1"),
        ("quest:budget=64,page=0", "'page' must be an integer >= 1"),
        ("quest:budget=8,page=16", "'page' must be <= 'budget', got 16 and 8"),
        ("quest:budget=64,skip_layers=-1", "'skip_layers' must be an integer >= 0"),
        ("quest:budget=64,chunk=0", "'chunk' must be an integer >= 1"),
    ],
)
def test_bad_quest_specs_name_the_parameter(spec, message):
    with pytest.raises(longlab.SpecError, match=message):
        longlab.parse(spec)


def test_quest_keeps_everything_on_the_inputs_device(strict_device, device):
    """A padded batch decoding with a budget below the cache under ``strict_device``: every tensor
    made on the inputs' device, page bounds included."""
    model = longlab.apply(build().to(device), "selfextend:group=4,window=16+quest:budget=32,page=8,skip_layers=0")
    ids = torch.randint(3, 128, (2, 120), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :37] = 0
    cache = DynamicCache()
    with strict_device(), torch.no_grad():
        tokens = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=4, do_sample=False)
        stats = longlab.cache_stats(cache)
    assert tokens.device == ids.device and stats.bytes_read < stats.bytes_held
    for layer in cache.layers:
        store = layer.entries
        assert store.pages == math.ceil(123 / 8)
        stored = [*store.fields.values(), *store.low.values(), *store.high.values(), store.first, store.last]
        assert all(t.device == ids.device for t in stored)


def test_padding_only_pages_are_never_bounded_above_minus_infinity():
    """A left-padded row's first pages hold no real key: their bound is -inf, so they are never
    chosen over a real page."""
    _, k, _ = _tensors(groups=1)
    positions = torch.arange(N, dtype=torch.int32).expand(B, HK, N).clone()
    positions[1, :, :20] = -1
    store = PagedEntries.paged({"keys": k, "values": k, "positions": positions}, PAGE)
    store.refresh(key_maps(_segments("none")), TABLE)
    q = torch.randn(B, HK, D, dtype=torch.float64)
    bounds = page_bounds(store, q, torch.full((B,), N - 1), _segments("none"), TABLE)
    assert bool((bounds[1, :, :2] == -math.inf).all()) and bool(torch.isfinite(bounds[1, :, 3:]).all())
    assert bool(torch.isfinite(bounds[0]).all())


def test_reordering_batch_rows_moves_their_page_bounds():
    """Beam search reorders rows: each row's page bounds move with it, equal to bounds recomputed
    from the reordered entries."""
    _, k, _ = _tensors(groups=1)
    store = _store(k, "selfextend")
    store.select(torch.tensor([1, 1, 0]))
    fresh = PagedEntries.paged({name: store.dense(name) for name in store.fields}, PAGE)
    fresh.refresh(store.maps, TABLE)
    for key_map in store.maps:
        assert torch.equal(store.low[key_map], fresh.low[key_map])
        assert torch.equal(store.high[key_map], fresh.high[key_map])
    assert torch.equal(store.first, fresh.first) and torch.equal(store.last, fresh.last)


def test_beam_search_decodes_with_quest():
    model = longlab.apply(build(), "quest:budget=16,page=4,skip_layers=0")
    ids = torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, max_new_tokens=4, num_beams=3, do_sample=False)
    assert out.shape == (1, 64) and longlab.cache_stats(model).bytes_read < longlab.cache_stats(model).bytes_held
