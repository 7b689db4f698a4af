"""PoSE position ids against the paper's definition, and S²-Attn against a naive masked reference."""

from __future__ import annotations

import collections
import itertools
import random

import pytest
import torch
from tests.support import reference

from longlab.attention.kernel import segmented_attention
from longlab.errors import LonglabError
from longlab.positions.rope import FrequencyTable
from longlab.positions.segments import Segment
from longlab.training.pose import pose_positions
from longlab.training.s2attn import shifted_order, shifted_sparse_attention


def _skips(positions: list[int]) -> list[int]:
    """The skipping bias of every token: its position minus its index in the row."""
    return [p - i for i, p in enumerate(positions)]


@pytest.mark.parametrize("chunks", [1, 2, 3, 5])
def test_pose_positions_are_chunks_with_nondecreasing_skips(chunks):
    # Zhu et al. 2023 section 3.2: chunk i holds {st_i + u_i, ..., st_i + u_i + l_i - 1},
    # 0 = u_0 <= u_1 <= ... <= u_{N-1} <= L_t - L_c
    train, target = 32, 100
    rng = random.Random(0)
    for _ in range(200):
        positions = pose_positions(rng, train, target, chunks)
        skips = _skips(positions)
        assert len(positions) == train
        assert skips[0] == 0
        assert all(a <= b for a, b in itertools.pairwise(skips))
        assert len(set(skips)) <= chunks
        assert skips[-1] <= target - train and positions[-1] < target


def test_pose_with_one_chunk_is_the_plain_window():
    assert pose_positions(random.Random(3), 16, 64, chunks=1) == list(range(16))


def test_pose_skip_and_chunk_length_are_uniform():
    # N = 2: u_1 ~ U({0, ..., L_t - L_c}) and the cut l_0 ~ U({1, ..., L_c - 1})
    train, target, draws = 6, 14, 18_000
    rng = random.Random(1)
    skip_counts, cut_counts = collections.Counter(), collections.Counter()
    for _ in range(draws):
        positions = pose_positions(rng, train, target, 2)
        skips = _skips(positions)
        cut = next((i for i in range(1, train) if skips[i] != skips[0]), None)
        skip_counts[skips[-1]] += 1
        if cut is not None:
            cut_counts[cut] += 1
    assert set(skip_counts) == set(range(target - train + 1))
    expected = draws / (target - train + 1)
    assert all(abs(n - expected) < 0.1 * expected for n in skip_counts.values())
    # when u_1 = 0 the cut is invisible; the rest spreads evenly over 1 .. L_c - 1
    visible = sum(cut_counts.values()) / (train - 1)
    assert set(cut_counts) == set(range(1, train))
    assert all(abs(n - visible) < 0.1 * visible for n in cut_counts.values())


def test_pose_second_skip_is_uniform_above_the_first():
    # N = 3: given u_1, u_2 ~ U({u_1, ..., L_t - L_c})
    train, target = 8, 12
    rng = random.Random(2)
    given = collections.defaultdict(collections.Counter)
    for _ in range(30_000):
        skips = sorted(set(_skips(pose_positions(rng, train, target, 3))))
        if len(skips) == 3 and skips[1] == 1:
            given[skips[1]][skips[2]] += 1
    counts = given[1]
    assert set(counts) == {2, 3, 4}  # u_2 = u_1 merges two chunks, so only u_2 > u_1 is visible here
    mean = sum(counts.values()) / 3
    assert all(abs(n - mean) < 0.15 * mean for n in counts.values())


def test_pose_covers_every_relative_distance_of_the_target():
    train, target = 8, 40
    rng = random.Random(4)
    seen = set()
    for _ in range(3000):
        p = pose_positions(rng, train, target, 2)
        seen.update(b - a for i, a in enumerate(p) for b in p[i:])
    assert seen == set(range(target))


def test_pose_refuses_a_target_not_longer_than_training():
    with pytest.raises(LonglabError, match="target length"):
        pose_positions(random.Random(0), 64, 64)
    with pytest.raises(LonglabError, match="chunks"):
        pose_positions(random.Random(0), 64, 128, chunks=0)


# -- S²-Attn ------------------------------------------------------------------------------------


def _s2_visible(length: int, group: int, shifted: bool) -> torch.Tensor:
    """LongLoRA section 3.2 written as a mask: token i sees j <= i in its own group; in the shifted half
    of the heads the groups start half a group later (the leftover halves at both ends are one group)."""
    i = torch.arange(length)
    index = (i - group // 2) % length if shifted else i
    same = (index[:, None] // group) == (index[None, :] // group)
    return same & (i[:, None] >= i[None, :])


def _kernel(table):
    def attend(module, q, k, v, q_pos, k_pos, key_valid):
        return segmented_attention(q, k, v, q_pos, k_pos, (Segment(),), table, 0.25, key_valid)

    return attend


@pytest.mark.parametrize("length,group", [(16, 4), (24, 8), (32, 32)])
def test_s2attn_equals_naive_masked_attention_forward_and_backward(length, group):
    torch.manual_seed(0)
    b, hq, hk, d = 2, 4, 2, 16
    q = torch.randn(b, hq, length, d, requires_grad=True)
    k = torch.randn(b, hk, length, d, requires_grad=True)
    v = torch.randn(b, hk, length, d, requires_grad=True)
    freqs = reference.inv_freq(d) / 4  # PI, factor 4
    table = FrequencyTable(freqs.float())
    pos = torch.arange(length)[None].expand(b, length)
    out = shifted_sparse_attention(_kernel(table), group, None, q, k, v, pos, pos, None)

    rel = (pos[0][:, None] - pos[0][None, :]).double()
    heads = ((slice(0, hq // 2), slice(0, hk // 2)), (slice(hq // 2, hq), slice(hk // 2, hk)))  # GQA pairs kept
    halves = [
        reference.attention(q[:, h], k[:, g], v[:, g], _s2_visible(length, group, shifted), rel, freqs, 0.25)
        for shifted, (h, g) in enumerate(heads)
    ]
    expected = torch.cat(halves, dim=1)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)

    weights = torch.randn(out.shape, dtype=torch.float64)
    ours = torch.autograd.grad((out.double() * weights).sum(), (q, k, v))
    theirs = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    for a, e in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, e, atol=5e-5, rtol=1e-4)


def test_s2attn_with_one_group_is_plain_causal_attention():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    table = FrequencyTable(reference.inv_freq(8).float())
    pos = torch.arange(12)[None]
    plain = segmented_attention(q, k, v, pos, pos, (Segment(),), table, 0.25)
    torch.testing.assert_close(shifted_sparse_attention(_kernel(table), 12, None, q, k, v, pos, pos, None), plain)


def test_s2attn_shift_is_undone():
    order = shifted_order(16, 4, torch.device("cpu"))
    assert sorted(order.tolist()) == list(range(16))
    assert order[:12].tolist() == list(range(2, 14)) and order[12:].tolist() == [0, 1, 14, 15]
    # attention that returns each token's own value: the output must come back in token order
    identity = lambda module, q, k, v, q_pos, k_pos, key_valid: v.repeat_interleave(q.shape[1] // v.shape[1], 1)  # noqa: E731
    v = torch.arange(16.0).view(1, 1, 16, 1).expand(1, 2, 16, 2)
    q = torch.zeros(1, 4, 16, 2)
    out = shifted_sparse_attention(identity, 4, None, q, v, v, torch.arange(16)[None], None, None)
    assert torch.equal(out[0, :, :, 0], torch.arange(16.0).expand(4, 16))


def test_s2attn_refuses_a_group_that_does_not_divide_the_length():
    q = torch.zeros(1, 2, 10, 4)
    with pytest.raises(LonglabError, match="group"):
        shifted_sparse_attention(None, 4, None, q, q, q, torch.arange(10)[None], None, None)


def test_s2attn_runs_on_the_meta_device():
    q, k = torch.empty(1, 4, 16, 8, device="meta"), torch.empty(1, 2, 16, 8, device="meta")
    seen = []

    def attend(module, q, k, v, q_pos, k_pos, key_valid):
        seen.append({q.device, q_pos.device})
        return torch.empty(q.shape, device=q.device)

    out = shifted_sparse_attention(attend, 4, None, q, k, k, torch.arange(16, device="meta")[None], None, None)
    assert out.device.type == "meta" and seen == [{torch.device("meta")}] * 2
