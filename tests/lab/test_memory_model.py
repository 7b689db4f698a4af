"""Memory components that change the token stream (``rmt``, ``landmark``) against their papers written
plainly: RMT as an explicit segment loop over hand-written blocks (same weights, float64), landmark
attention as the paper's grouped softmax pair by pair (Mohtashami & Jaggi, 2023, §3.1), and its
top-k inference (§3.2) as the same formula with the unretrieved blocks removed."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from longlab.errors import SpecError
from longlab.lab.attention.landmark import drop_landmarks, insert_landmarks
from longlab.lab.components import component, model_spec
from longlab.lab.model import SIZES, LabModel
from longlab.lab.positions.base import ModelShape
from longlab.lab.presets import PRESETS
from support.lab import train_steps

SHAPE = ModelShape(d_model=16, heads=4, head_dim=4, train_length=8, layers=2)


def _model(spec: str, vocab: int = 40, dtype=torch.float64) -> LabModel:
    torch.manual_seed(0)
    position, attention = model_spec(spec)
    return LabModel(vocab, SIZES["tiny"], position, train_length=16, attention=attention).to(dtype)


# --- RMT: a hand-written decoder block and an explicit segment loop -------------------------------


def _rms(x, weight):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps) * weight


def _rope(x, pos, base=10000.0):
    """Su et al. 2021 eq. 34 on channel pairs (i, i + d/2): angle pos * base^(-2i/d)."""
    d = x.shape[-1]
    inv = (1.0 / base ** (torch.arange(0, d, 2).float() / d)).double()  # the table is float32, as in transformers
    angle = pos.double()[:, None] * inv
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat((x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()), -1)


def _plain_block(block, x, pos, visible):
    """Pre-norm block: x + Attn(RMSNorm x) with mask ``visible`` (T, T), then x + SwiGLU(RMSNorm x)."""
    b, t, dm = x.shape
    heads = SIZES["tiny"].heads
    hd = dm // heads
    att = block.attention
    qkv = _rms(x, block.norm1.weight) @ att.qkv.weight.T
    q, k, v = (part.view(b, t, heads, hd).transpose(1, 2) for part in qkv.split(dm, -1))
    scores = _rope(q, pos) @ _rope(k, pos).transpose(-1, -2) / math.sqrt(hd)
    y = torch.softmax(scores.masked_fill(~visible, -math.inf), -1) @ v
    x = x + y.transpose(1, 2).reshape(b, t, dm) @ att.out.weight.T
    gate, up = (_rms(x, block.norm2.weight) @ block.up.weight.T).chunk(2, -1)
    return x + (F.silu(gate) * up) @ block.down.weight.T


def naive_rmt(model, ids, segment):
    """Bulatov et al. 2022, §3: H_t = [M_t; X_t; M_t] through every layer; M_{t+1} = last layer at the
    write places; M_0 the learned memory; positions restart at 0 in each segment."""
    backbone = model.model
    x = backbone.embed(ids)
    memory = backbone.runner.memory[None].expand(ids.shape[0], -1, -1)
    m = memory.shape[1]
    outs = []
    for a in range(0, ids.shape[1], segment):
        tokens = x[:, a : a + segment]
        h = torch.cat((memory, tokens, memory), 1)
        n = h.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        for block in backbone.blocks:
            h = _plain_block(block, h, torch.arange(n), causal)
        outs.append(h[:, m : m + tokens.shape[1]])
        memory = h[:, m + tokens.shape[1] :]
    return _rms(torch.cat(outs, 1), backbone.norm.weight)


def _check_model(model, reference, ids):
    ours = model.model(ids).last_hidden_state
    theirs = reference()
    torch.testing.assert_close(ours, theirs)
    grad = torch.randn_like(ours)
    params = [p for p in model.parameters() if p.numel()]  # an empty memory (memory_tokens=0) is unused
    for a, b in zip(torch.autograd.grad(ours, params, grad), torch.autograd.grad(theirs, params, grad), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("segment", "memory", "length"), [(8, 3, 29), (5, 1, 10), (32, 4, 20)])
def test_rmt_equals_an_explicit_segment_loop(segment, memory, length):
    model = _model(f"rope+rmt:segment={segment},memory_tokens={memory}")
    ids = torch.randint(0, 40, (2, length))
    _check_model(model, lambda: naive_rmt(model, ids, segment), ids)
    # the memory carries information: changing the first segment changes the last one's output
    other = ids.clone()
    other[:, 0] = (other[:, 0] + 1) % 40
    if length > segment:
        last = slice(length - 1, length)
        with torch.no_grad():
            a = model.model(ids).last_hidden_state[:, last]
            b = model.model(other).last_hidden_state[:, last]
        assert not torch.allclose(a, b)


def test_rmt_without_memory_is_attention_within_each_segment():
    """memory_tokens=0: the whole sequence under a block-diagonal causal mask at global positions."""
    model = _model("rope+rmt:segment=6,memory_tokens=0")
    ids = torch.randint(0, 40, (2, 20))
    i, j = torch.arange(20)[:, None], torch.arange(20)[None, :]
    visible = (j <= i) & (i // 6 == j // 6)

    def reference():
        x = model.model.embed(ids)
        for block in model.model.blocks:
            x = _plain_block(block, x, torch.arange(20), visible)
        return _rms(x, model.model.norm.weight)

    _check_model(model, reference, ids)
    # and the same weights as the plain RoPE model: its own parameters come from a forked stream
    plain = _model("rope")
    for (name, p), (_, q) in zip(plain.named_parameters(), model.named_parameters(), strict=False):
        torch.testing.assert_close(p, q, msg=name)


# --- Landmark: the grouped softmax pair by pair ---------------------------------------------------


def naive_landmark(q, k, v, block, top_k=None):
    """Mohtashami & Jaggi 2023, §3.1, float64, one (batch, head, query, key) at a time. Place a is a
    landmark iff (a + 1) % (block + 1) == 0; p_a = index of a's block's landmark (T if none; a itself
    for a landmark). G_ij = p_j if p_j != j; -1 if p_i == j; p_i otherwise. S_i = grouped softmax of
    q_i.k_j / sqrt(d) over j <= i; weight 0 for landmarks, S_ij if G_ij == G_ii, else S_ij * S_{i,p_j}.
    top_k (§3.2): only the top_k earlier landmarks by score, and their blocks, stay visible."""
    bsz, heads, t, d = q.shape
    w = block + 1

    def p(a):
        return min((a // w) * w + block, t)

    def is_mark(a):
        return (a + 1) % w == 0

    out = torch.zeros_like(v)
    out = [[[None] * t for _ in range(heads)] for _ in range(bsz)]
    for b in range(bsz):
        for h in range(heads):
            for i in range(t):
                score = {j: (q[b, h, i] @ k[b, h, j]) / math.sqrt(d) for j in range(i + 1)}
                earlier = [j for j in score if is_mark(j) and j // w < i // w]
                if top_k is not None and len(earlier) > top_k:
                    kept = sorted(earlier, key=lambda j: -score[j].item())[:top_k]
                    dropped = {j // w for j in earlier if j not in kept}
                    score = {j: s for j, s in score.items() if j // w not in dropped}
                group = {j: (p(j) if p(j) != j else (-1 if p(i) == j else p(i))) for j in score}
                S = {}
                for g in set(group.values()):
                    members = [j for j in score if group[j] == g]
                    for j, s in zip(members, torch.softmax(torch.stack([score[j] for j in members]), 0), strict=True):
                        S[j] = s
                total = torch.zeros_like(v[b, h, 0])
                for j in score:
                    if is_mark(j):
                        continue
                    weight = S[j] if group[j] == group[i] else S[j] * S[p(j)]
                    total = total + weight * v[b, h, j]
                out[b][h][i] = total
    return torch.stack([torch.stack([torch.stack(row) for row in hs]) for hs in out])


def _qkv(t=18, d=4):
    return tuple(torch.randn(1, 2, t, d, dtype=torch.float64, requires_grad=True) for _ in range(3))


def _check(ours, reference, inputs):
    torch.testing.assert_close(ours, reference)
    grad = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(reference, inputs, grad), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("block", "t"), [(3, 18), (3, 16), (4, 10), (1, 7), (8, 6)])
def test_grouped_softmax_equals_the_paper(block, t):
    q, k, v = _qkv(t)
    module = component(f"landmark:block={block}").build(SHAPE, 0).train()
    _check(module(q, k, v, torch.arange(t)), naive_landmark(q, k, v, block), (q, k, v))


@pytest.mark.parametrize("top_k", [1, 2])
def test_top_k_inference_equals_the_paper_with_unretrieved_blocks_removed(top_k):
    q, k, v = _qkv(22)
    module = component(f"landmark:block=3,top_k={top_k}").build(SHAPE, 0).eval()
    _check(module(q, k, v, torch.arange(22)), naive_landmark(q, k, v, 3, top_k), (q, k, v))


def test_inference_with_every_block_retrieved_is_the_training_form():
    q, k, v = (x.detach() for x in _qkv(22))  # 5 complete blocks: at most 5 earlier landmarks
    trained = component("landmark:block=3,top_k=5").build(SHAPE, 0).train()(q, k, v, torch.arange(22))
    inferred = component("landmark:block=3,top_k=5").build(SHAPE, 0).eval()(q, k, v, torch.arange(22))
    torch.testing.assert_close(inferred, trained)
    fewer = component("landmark:block=3,top_k=2").build(SHAPE, 0).eval()(q, k, v, torch.arange(22))
    assert not torch.allclose(fewer, trained)


def test_insert_and_drop_landmarks():
    x = torch.arange(11)[None]
    stream = insert_landmarks(x, torch.tensor(-1), 4)
    assert stream.tolist() == [[0, 1, 2, 3, -1, 4, 5, 6, 7, -1, 8, 9, 10]]
    assert drop_landmarks(stream, 4).tolist() == x.tolist()


def test_the_landmark_model_keeps_the_input_length_and_its_eval_mode_at_full_top_k_is_training():
    model = _model("rope+landmark:block=4,top_k=8")
    ids = torch.randint(0, 40, (2, 30))  # 7 blocks
    with torch.no_grad():
        trained = model.train().model(ids).last_hidden_state
        inferred = model.eval().model(ids).last_hidden_state
    assert trained.shape == (2, 30, 64)
    torch.testing.assert_close(inferred, trained)


def test_landmark_tokens_sit_at_their_blocks_last_position():
    seen = []
    model = _model("rope+landmark:block=4")
    model.model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[1].tolist()))
    model.model(torch.randint(0, 40, (1, 10)), torch.arange(10) * 3)
    assert seen == [[0, 3, 6, 9, 9, 12, 15, 18, 21, 21, 24, 27]]


# --- both: training, lengths, specs -------------------------------------------------------------


@pytest.mark.parametrize("spec", ["rope+rmt:segment=8,memory_tokens=2", "rope+landmark:block=8,top_k=1"])
def test_the_model_trains(spec):
    model = _model(spec, dtype=torch.float32)
    ids = torch.randint(0, 40, (4, 32))
    assert model.model(ids).last_hidden_state.shape == (4, 32, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def memory_learns(model):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        assert model.model.runner.parameters().__next__().grad.abs().sum() > 0  # memory / landmark learn

    losses = train_steps(model, ids, optimizer, 25, memory_learns)
    assert losses[-1] < 0.8 * losses[0]


def test_runs_on_the_meta_device():
    for spec in ("rope+rmt:segment=8", "rope+landmark:block=8,top_k=1"):
        model = _model(spec, dtype=torch.float32).to("meta").eval()
        out = model.model(torch.zeros(1, 40, dtype=torch.long, device="meta")).last_hidden_state
        assert out.shape == (1, 40, 64) and out.device.type == "meta"


def test_bad_parameters_are_refused():
    with pytest.raises(SpecError, match="'segment' must be an integer >= 1"):
        model_spec("rope+rmt:segment=0")
    with pytest.raises(SpecError, match="'memory_tokens' must be an integer >= 0"):
        model_spec("rope+rmt:memory_tokens=-1")
    with pytest.raises(SpecError, match="'block' must be an integer >= 1"):
        model_spec("rope+landmark:block=0")
    with pytest.raises(SpecError, match="'top_k' must be an integer >= 1"):
        model_spec("rope+landmark:top_k=0")
    with pytest.raises(SpecError, match="cannot add alibi's position bias"):
        model_spec("alibi+landmark")
    assert model_spec("alibi+rmt")[1].name == "rmt"  # each segment is plain attention: a bias applies


def test_the_memory_preset_lists_both():
    assert {"rope+rmt", "rope+landmark"} <= set(PRESETS["memory"])
