"""pcw, nbce and retrieval_attention (issue 14), each against a naive reference written here."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from tests.support import reference

import longlab
from longlab.attention.kernel import segmented_attention
from longlab.cache import far as far_module
from longlab.cache.layer import LonglabLayer
from longlab.cache.policies.retrieval import RetrievalAttention
from longlab.cache.policy import ScoreContext, Scoring
from longlab.context import rows as chunks
from longlab.context.base import ContextQuery
from longlab.context.nbce import NBCE, combine
from longlab.context.pcw import PCW, merge_rows, prefill_windows
from longlab.errors import LonglabError, SpecError
from longlab.generation import generate_answers
from longlab.positions.segments import Segment
from longlab.spec import parse

D, HK, HQ = 16, 2, 4


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = longlab.load("tiny")
    return model, tokenizer


def _scoring(device) -> tuple[Scoring, longlab.positions.FrequencyTable]:
    table = longlab.positions.FrequencyTable(reference.inv_freq(D).to(device))
    return Scoring((Segment(),), lambda length: table, D**-0.5, 0, 1), table


def _attend(table, q, k, v, q_pos, k_pos, key_valid):
    return segmented_attention(q, k, v, q_pos, k_pos, (Segment(),), table, D**-0.5, key_valid)


# -- pcw ---------------------------------------------------------------------------------------------


def _pcw_visible(lengths: list[int], task: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The PCW pattern written out (Ratner et al. 2023, section 2): token i of window a sees token j
    of window b iff a == b and j <= i; task token t sees every window token and task tokens <= t.
    Positions: 0 .. len - 1 in each window, task tokens from the longest window's length on."""
    owner = [w for w, n in enumerate(lengths) for _ in range(n)] + [-1] * task
    pos = [p for n in lengths for p in range(n)] + [max(lengths) + t for t in range(task)]
    total = len(owner)
    visible = torch.zeros(total, total, dtype=torch.bool)
    for i in range(total):
        for j in range(total):
            if owner[i] == -1:
                visible[i, j] = owner[j] != -1 or (j <= i)
            else:
                visible[i, j] = owner[i] == owner[j] and j <= i
    return visible, torch.tensor(pos)


def test_pcw_attention_on_random_tensors_equals_the_naive_masked_reference(device, strict_device):
    """Windows written as rows of one cache layer, merged, then task queries attend over the merged
    layer: equal to O(L^2) attention with the explicit PCW mask and PCW positions."""
    lengths, task = [5, 7, 6], 3
    g = torch.Generator().manual_seed(3)
    keys = [torch.randn(1, HK, n, D, generator=g, dtype=torch.float64) for n in lengths]
    values = [torch.randn(1, HK, n, D, generator=g, dtype=torch.float64) for n in lengths]
    q = torch.randn(1, HQ, task, D, generator=g, dtype=torch.float64).to(device)
    k_task = torch.randn(1, HK, task, D, generator=g, dtype=torch.float64).to(device)
    v_task = torch.randn(1, HK, task, D, generator=g, dtype=torch.float64).to(device)
    width = max(lengths)

    def padded(parts):  # left padding, as a batch of windows is written
        return torch.cat([torch.nn.functional.pad(x, (0, 0, width - x.shape[2], 0)) for x in parts]).to(device)

    valid = torch.tensor([[i >= width - n for i in range(width)] for n in lengths], device=device)
    positions = (torch.cumsum(valid.long(), dim=1) - 1).clamp(min=0)
    scoring, table = _scoring(device)
    with strict_device():
        layer = LonglabLayer(None)
        layer.append(padded(keys), padded(values), positions, valid)
        merged = merge_rows(layer)
        assert merged.entries.longest == sum(lengths) and merged.seen == sum(lengths)
        q_pos = torch.arange(width, width + task, device=device)[None]
        q_valid = torch.ones(1, task, dtype=torch.bool, device=device)
        ours = merged.attend(q, k_task, v_task, q_pos, q_valid, functools.partial(_attend, table), scoring)

    visible, pos = _pcw_visible(lengths, task)
    all_k = torch.cat([*keys, k_task.cpu()], dim=2)
    all_v = torch.cat([*values, v_task.cpu()], dim=2)
    rel = pos[-task:, None] - pos[None, :]
    expected = reference.attention(q.cpu(), all_k, all_v, visible[-task:], rel, reference.inv_freq(D), D**-0.5)
    torch.testing.assert_close(ours.cpu(), expected, atol=1e-10, rtol=1e-9)


def _masked_logits(model, windows: list[torch.Tensor], question: torch.Tensor) -> torch.Tensor:
    """Logits of the unpatched model (transformers' own eager attention and RoPE) over the whole
    sequence ``windows + question`` with the explicit PCW mask and positions."""
    visible, pos = _pcw_visible([w.numel() for w in windows], question.numel())
    additive = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            full = torch.cat([*windows, question])[None]
            return model(input_ids=full, attention_mask=additive[None, None], position_ids=pos[None]).logits[0]
    finally:
        model.set_attn_implementation(previous)


def test_pcw_through_the_bundled_model_equals_the_plain_model_with_the_pcw_mask(tiny):
    """Every window's and every task token's logits equal those of the unpatched model (transformers'
    own eager attention and RoPE) given the whole sequence with the explicit PCW mask and positions."""
    model, _ = tiny
    lengths, task = [20, 27, 23], 6
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(3, 8000, (n,), generator=g) for n in lengths]
    question = torch.randint(3, 8000, (task,), generator=g)
    with torch.no_grad():
        longlab.apply(model, "none")
        try:
            cache = prefill_windows(model, windows, pad=1)
            start = max(lengths)
            ours = chunks.forward(model, cache, input_ids=question[None],
                                  position_ids=torch.arange(start, start + task)[None]).logits[0]  # fmt: skip
            ids, mask, positions = chunks.left_padded(windows, 1)
            window_logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        finally:
            longlab.reset(model)
    expected = _masked_logits(model, windows, question)
    torch.testing.assert_close(ours, expected[-task:], atol=2e-4, rtol=1e-4)
    offset = 0
    for row, n in enumerate(lengths):  # each window's own tokens, read alone
        torch.testing.assert_close(window_logits[row, -n:], expected[offset : offset + n], atol=2e-4, rtol=1e-4)
        offset += n


def _passkey_query(tokenizer, filler: int) -> ContextQuery:
    from longlab.data import synthetic

    context = " ".join([synthetic.NOISE] * filler) + "\n" + synthetic.PASSKEY_NEEDLE.format(key=4712) + "\n"
    return ContextQuery(synthetic.PASSKEY_TASK + "\n", context, synthetic.PASSKEY_QUESTION)


def _plain_answer(model, tokenizer, query, new_tokens):
    ids = torch.cat(chunks.encode_parts(tokenizer, query, torch.device("cpu")))[None]
    return generate_answers(model, tokenizer, [ids], new_tokens, first_line=True)


def test_pcw_answer_on_several_windows_follows_the_masked_reference(tiny, monkeypatch):
    """A passkey query cut into several windows of unequal lengths: the logits pcw decodes from are
    the reference's at the task tokens (placed after the longest window), and so is its token."""
    model, tokenizer = tiny
    query = _passkey_query(tokenizer, 12)
    method = PCW(window=70)
    windows, question = method.windows(model, tokenizer, query, 1)
    assert len(windows) >= 3 and len({w.numel() for w in windows}) > 1
    expected = _masked_logits(model, windows, question)[-question.numel() :]
    seen = []
    forward = chunks.forward

    def spy(model, cache, **inputs):
        out = forward(model, cache, **inputs)
        seen.append(out.logits[0])
        return out

    monkeypatch.setattr(chunks, "forward", spy)
    longlab.apply(model, "none")
    try:
        answer = method.answer(model, tokenizer, [query], 1, False)
    finally:
        longlab.reset(model)
    torch.testing.assert_close(seen[-1], expected, atol=2e-4, rtol=1e-4)
    assert answer == [tokenizer.decode([int(expected[-1].argmax())])]


@pytest.mark.parametrize("method", [PCW(), NBCE(beta=0.0)])
def test_one_window_at_identity_settings_equals_plain_generation(tiny, method):
    """A context that fits one window is read whole: pcw is then the plain model; nbce with beta = 0
    pools its only chunk, so it is the plain model too."""
    model, tokenizer = tiny
    query = _passkey_query(tokenizer, 4)
    longlab.apply(model, "none")
    try:
        assert method.answer(model, tokenizer, [query], 6, True) == _plain_answer(model, tokenizer, query, 6)
    finally:
        longlab.reset(model)


# -- nbce --------------------------------------------------------------------------------------------


def _naive_nbce(rows: list[list[float]], beta: float) -> list[float]:
    """Su 2023 (kexue.fm/archives/9617), written out: log-softmax per row, entropy per context row,
    the least-entropy row k, (1 + beta) log p_k - beta log p_0 (p_0: the context-free row)."""
    logp = []
    for row in rows:
        z = math.log(sum(math.exp(x) for x in row))
        logp.append([x - z for x in row])
    entropies = [-sum(math.exp(lp) * lp for lp in row) for row in logp[1:]]
    k = 1 + entropies.index(min(entropies))
    return [(1 + beta) * a - beta * b for a, b in zip(logp[k], logp[0], strict=True)]


def test_nbce_combination_equals_the_formula_on_fixed_logits(strict_device):
    rows = [
        [0.5, 0.2, -1.0, 0.0, 0.3],  # without context
        [2.0, 0.1, 0.0, -0.5, 0.4],
        [0.0, 4.0, -2.0, 0.0, 0.1],  # the least entropy
        [1.0, 1.0, 1.0, 0.9, 1.0],
    ]
    expected = torch.tensor(_naive_nbce(rows, 0.25))
    with strict_device():
        ours = combine(torch.tensor(rows, device="cpu"), 0.25, 1.0)
    torch.testing.assert_close(ours, expected)
    assert int(ours.argmax()) == 1  # row 2 is the surest; its token 1 wins


def test_nbce_top_p_and_the_floor_follow_the_reference_code():
    """Top-p truncation per row (tokens outside the nucleus get -inf) and, where the context-free
    log-probability is below -100, the pooled row's log-probability alone."""
    free = [0.0, 0.0, -500.0, 0.0]  # token 2 is impossible without context: below the floor
    sure = [0.0, 9.0, 8.0, -9.0]  # nucleus at 0.9: tokens 1 and 2
    rows = [free, sure, [0.0, 0.0, 0.0, 0.0]]
    ours = combine(torch.tensor(rows), 0.5, 0.9)
    logp_sure = torch.log_softmax(torch.tensor(sure), -1)
    logp_free = torch.log_softmax(torch.tensor(free), -1)
    assert math.isinf(ours[0]) and math.isinf(ours[3])  # outside the pooled row's nucleus
    torch.testing.assert_close(ours[1], 1.5 * logp_sure[1] - 0.5 * logp_free[1])
    torch.testing.assert_close(ours[2], logp_sure[2])  # the floor: no context-free correction


def test_nbce_first_token_pools_the_rows_read_alone(tiny):
    """The batched, left-padded rows give the same first token as each row read alone by the plain
    model, pooled by the formula."""
    model, tokenizer = tiny
    query = _passkey_query(tokenizer, 12)
    method = NBCE(chunk=60)
    instruction, context, question = chunks.encode_parts(tokenizer, query, torch.device("cpu"))
    parts = chunks.split("nbce", context, 60)
    assert len(parts) >= 3
    rows = [torch.cat((instruction, question))] + [torch.cat((instruction, p, question)) for p in parts]
    with torch.no_grad():
        alone = torch.stack([model(input_ids=row[None]).logits[0, -1] for row in rows])
    expected = tokenizer.decode([int(torch.tensor(_naive_nbce(alone.double().tolist(), 0.25)).argmax())])
    longlab.apply(model, "none")
    try:
        answer = NBCE(chunk=60, top_p=1.0).answer(model, tokenizer, [query], 1, False)[0]
        assert method.answer(model, tokenizer, [query], 1, False)[0] == answer  # top-p keeps the argmax here
    finally:
        longlab.reset(model)
    assert answer == expected


# -- retrieval_attention -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "method", "window"), [("faiss", "none", 5), ("torch", "none", 5), ("faiss", "dca", 14)]
)
def test_retrieved_keys_are_the_exact_top_k_of_a_naive_reference(
    device, strict_device, monkeypatch, backend, method, window
):
    """After a prompt, far keys live in the index; a decoding query's retrieved keys per query head
    are the top_k far keys by the logit attention gives them, computed pairwise here in float64 from
    the distance formula of tests/support/reference.py (plain RoPE; DCA with chunk 8, local window 2,
    every far key two chunks or more behind the query)."""
    if backend == "torch":  # the CUDA path, exercised on any device
        monkeypatch.setattr(far_module, "INDEXES", {})
    elif device.type != "cpu":
        pytest.skip("faiss is the CPU index")
    policy = RetrievalAttention(sinks=2, window=window, top_k=4)
    params = {"chunk_size": 8, "local_window": 2} if method == "dca" else {}
    segments = parse(f"{method}:chunk_size=8,local_window=2" if params else method)[0].segments()
    n = 30
    g = torch.Generator().manual_seed(5)
    k = torch.randn(1, HK, n + 1, D, generator=g).to(device)
    v = torch.randn(1, HK, n + 1, D, generator=g).to(device)
    q = torch.randn(1, HQ, n + 1, D, generator=g).to(device)
    pos = torch.arange(n + 1, device=device)[None]
    scoring, table = _scoring(device)
    scoring = Scoring(segments, scoring.table, scoring.scale, 0, 1)
    attend = functools.partial(_attend, table)
    with strict_device():
        layer = LonglabLayer(policy)
        ones = torch.ones(1, n, dtype=torch.bool, device=device)
        layer.attend(q[:, :, :n], k[:, :, :n], v[:, :, :n], pos[:, :n], ones, attend, scoring)
        assert layer.entries.longest == 2 + window and layer.entries.far.length == n - 2 - window
        layer.append(k[:, :, n:], v[:, :, n:], pos[:, n:], ones[:, :1])
        ctx = ScoreContext(layer, q[:, :, n:], pos[:, n:], ones[:, :1], segments, scoring.table(n + 1),
                           scoring.scale, 0, 1)  # fmt: skip
        read_pos = policy.reads(ctx, *layer.view()).positions
    far_pos = list(range(2, n - window))
    _, rel = reference.distances(method, torch.tensor([n]), torch.tensor(far_pos), **params)
    group = HQ // HK
    for h in range(HQ):
        rotated = reference.rotate_pairwise(q[:, h : h + 1, n:].cpu().double(), rel, reference.inv_freq(D))
        scores = (rotated[0, 0, 0] * k[0, h // group, far_pos].cpu().double()).sum(-1)
        expected = {far_pos[i] for i in scores.topk(4).indices.tolist()}
        assert set(read_pos[0, h, :4].tolist()) == expected
        assert sorted(read_pos[0, h, 4:].tolist()) == [0, 1, *range(n - window, n + 1)]  # sinks + window + new


def test_retrieval_with_top_k_covering_all_far_keys_equals_full_attention(tiny):
    model, _ = tiny
    ids = torch.randint(3, 8000, (1, 150), generator=torch.Generator().manual_seed(2))

    def logits(spec):
        longlab.apply(model, spec)
        try:
            out = model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)  # fmt: skip
        finally:
            longlab.reset(model)
        return torch.stack(out.logits), out.sequences

    full_logits, full_ids = logits("none")
    ours_logits, ours_ids = logits("retrieval_attention:sinks=4,window=16,top_k=1000")
    assert torch.equal(ours_ids, full_ids)
    torch.testing.assert_close(ours_logits, full_logits, atol=1e-4, rtol=1e-4)


def test_retrieval_holds_sinks_and_window_and_reports_the_far_store(tiny):
    model, _ = tiny
    ids = torch.randint(3, 8000, (1, 120), generator=torch.Generator().manual_seed(4))
    longlab.apply(model, "dca:chunk_size=256+retrieval_attention:sinks=4,window=32,top_k=8")
    try:
        out = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    finally:
        longlab.reset(model)
    for layer in out.past_key_values.layers:
        assert layer.entries.longest == 4 + 32
        assert layer.entries.far.length >= 120 - 36
        assert layer.nbytes < layer.entries.far_nbytes  # held on the device: a small part


# -- parsing and errors ----------------------------------------------------------------------------------


def test_specs_parse_and_compose():
    assert str(parse("retrieval_attention:top_k=16")[0]) == "retrieval_attention:sinks=4,window=256,top_k=16"
    kinds = {m.kind for m in parse("pcw:window=400+yarn:factor=4+snapkv:budget=256")}
    assert kinds == {"context", "position", "cache"}
    assert {m.kind for m in parse("nbce:beta=0.25+dca+retrieval_attention:top_k=8")} == {"context", "position", "cache"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("pcw:window=0", "'window' must be an integer >= 1"),
        ("nbce:beta=-1", "'beta' must be a finite number >= 0"),
        ("nbce:top_p=0", "'top_p' must be a number > 0 and <= 1"),
        ("nbce:top_p=1.5", "'top_p' must be a number > 0 and <= 1"),
        ("retrieval_attention:top_k=0", "'top_k' must be an integer >= 1"),
        ("retrieval_attention:window=0", "'window' must be an integer >= 1"),
    ],
)
def test_bad_parameters_name_the_parameter_and_range(spec, message):
    with pytest.raises(SpecError, match=message):
        parse(spec)


@pytest.mark.parametrize("method", [PCW(), NBCE()])
def test_empty_context_and_no_room_fail_clearly(tiny, method):
    model, tokenizer = tiny
    with pytest.raises(LonglabError, match=f"{method.name}: the query's context is empty"):
        method.answer(model, tokenizer, [ContextQuery("Read this.\n", "", "Answer:")], 4, True)
    with pytest.raises(LonglabError, match="leaving no room"):
        method.answer(model, tokenizer, [ContextQuery("Read this.\n", "x", "Answer:")], 600, True)


def test_pcw_needs_a_patched_model(tiny):
    model, tokenizer = tiny
    with pytest.raises(LonglabError, match=r"longlab\.apply"):
        PCW().answer(model, tokenizer, [_passkey_query(tokenizer, 2)], 2, True)


@pytest.mark.parametrize("spec", ["pcw:window=300", "nbce:chunk=300"])
def test_chunk_readers_tell_the_runner_what_they_read_and_refuse_chat(spec):
    """The runner's reach check counts a window plus the instruction and question, not the whole input;
    --chat is refused by name (the parts are placed as raw token ids)."""
    from longlab.context.base import FRAME_TOKENS

    method = parse(spec)[0]
    assert method.read_length(8192) == 300 + FRAME_TOKENS
    assert method.read_length(100) == 100
    with pytest.raises(LonglabError, match="--chat"):
        method.answer(None, None, [], 4, True, chat=True)
