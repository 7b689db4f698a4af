"""Sequence parallelism against single-process attention: gloo ranks spawned on CPU, one thread each.

One spawn per world size runs every case (process start-up dominates); each rank writes its shards,
gradients and counters to a file and the parent compares them with the single-process kernel.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import longlab
from longlab import LonglabError
from longlab.attention.kernel import segmented_attention
from longlab.parallel import (
    SequenceLayout,
    reset_stats,
    ring_attention,
    ring_segmented_attention,
    shard,
    stats,
    ulysses_attention,
    ulysses_segmented_attention,
)
from longlab.positions.rope import RopeConfig, base_inv_freq

HEAD_DIM = 16
ROPE = RopeConfig(HEAD_DIM, 10000.0, 64, base_inv_freq(HEAD_DIM, 10000.0))
SPECS = ["none", "yarn:factor=4", "rerope:window=40", "selfextend:group=4,window=24"]


@dataclass(frozen=True)
class Case:
    name: str
    algorithm: str  # ring | ulysses
    layout: str
    spec: str
    length: int
    heads: int = 4
    kv_heads: int = 2
    batch: int = 2
    block_size: int | None = None
    seed: int = 0


def _cases(world: int) -> list[Case]:
    cases = []
    for i, spec in enumerate(SPECS):
        layout = "zigzag" if i % 2 == 0 or world == 4 else "contiguous"
        # 131 and 97 do not divide by 2N: the layout pads the end of the sequence
        cases.append(Case(f"ring-{layout}-{spec}", "ring", layout, spec, (128, 131, 150, 97)[i], seed=i))
    cases.append(Case("ring-contiguous-blocked", "ring", "contiguous", SPECS[3], 120, block_size=16, seed=7))
    cases.append(Case("ring-zigzag-blocked-gqa4", "ring", "zigzag", SPECS[2], 101, 8, 2, 1, 16, seed=8))
    if world == 2:
        cases.append(Case("ulysses-zigzag-yarn", "ulysses", "zigzag", SPECS[1], 99, seed=9))
        cases.append(Case("ulysses-contiguous-selfextend", "ulysses", "contiguous", SPECS[3], 128, block_size=32))
    else:
        cases.append(Case("ulysses-zigzag-rerope", "ulysses", "zigzag", SPECS[2], 130, 8, 4, seed=10))
    return cases


def _balance_cases() -> list[Case]:
    return [Case(f"balance-{layout}", "ring", layout, "none", 2048, 1, 1, 1) for layout in ("zigzag", "contiguous")]


def _inputs(case: Case):
    g = torch.Generator().manual_seed(1000 + case.seed)
    shape_q = (case.batch, case.heads, case.length, HEAD_DIM)
    shape_kv = (case.batch, case.kv_heads, case.length, HEAD_DIM)
    q, k, v, grad = (torch.randn(s, generator=g) for s in (shape_q, shape_kv, shape_kv, shape_q))
    return q, k, v, grad


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_case(case: Case, rank: int, world: int) -> dict:
    q, k, v, grad = _inputs(case)
    layout = SequenceLayout(case.layout, world, case.length)
    local = [layout.split(x, rank, dim=2).requires_grad_() for x in (q, k, v)]
    attention = ring_attention if case.algorithm == "ring" else ulysses_attention
    reset_stats()
    out = attention(
        *local, layout=case.layout, position=case.spec, rope=ROPE, length=case.length, block_size=case.block_size
    )
    forward = stats().as_dict()
    out.backward(layout.split(grad, rank, dim=2))
    return {
        "out": out.detach(),
        "grads": [x.grad for x in local],
        "forward": forward,
        "total": stats().as_dict(),
        "local_kv_bytes": 2 * local[1].numel() * local[1].element_size(),
    }


def _padded_inputs(world: int):
    """Left-padded batch (row 1 starts with 21 padding tokens), positions as generate() assigns them."""
    case = Case("padded", "ring", "contiguous", SPECS[2], 32 * world, heads=8, kv_heads=4, seed=11)
    q, k, v, grad = _inputs(case)
    valid = torch.ones(case.batch, case.length, dtype=torch.bool)
    valid[1, :21] = False
    pos = (valid.long().cumsum(-1) - 1).masked_fill(~valid, 1)
    return case, q, k, v, grad, valid, pos


def _run_padded(rank: int, world: int) -> dict:
    """The kernel-level entry points with a padding mask: contiguous split, no padding at the end."""
    case, q, k, v, grad, valid, pos = _padded_inputs(world)
    layout = SequenceLayout("contiguous", world, case.length)
    method = longlab.parse(case.spec)[0].resolve(ROPE)
    table = method.table(ROPE, int(pos.max()) + 1)
    results = {}
    for name, fn in (("ring", ring_segmented_attention), ("ulysses", ulysses_segmented_attention)):
        local = [layout.split(x, rank, dim=2).requires_grad_() for x in (q, k, v)]
        p, m = layout.split(pos, rank), layout.split(valid, rank)
        out = fn(*local, p, p, method.segments(), table, 0.25, m, block_size=8)
        out.backward(layout.split(grad, rank, dim=2))
        results[name] = {"out": out.detach(), "grads": [x.grad for x in local]}
    return results


def _run_model(rank: int, world: int, spec: str, algorithm: str, layout: str, length: int) -> dict:
    # use_cache is left to the model's default for Ulysses: shard() must turn the KV cache off
    model, _ = longlab.load("tiny", dtype=torch.float32)
    longlab.apply(model, spec)
    ids = torch.randint(2, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(5))
    with shard(model, layout=layout, mode=algorithm) as sp:
        local_ids, position_ids = sp.split(ids)
        cache = {"use_cache": False} if algorithm == "ring" else {}
        logits = model(input_ids=local_ids, position_ids=position_ids, **cache).logits
        loss = sp.loss(logits, sp.labels(ids))
        loss.backward()
        sp.all_reduce_gradients()
        full_logits = sp.gather(logits.detach())
    assert longlab.bridge.patch_of(model).attend is None and model.config.use_cache  # restored on exit
    grads = {name: p.grad for name, p in model.named_parameters()} if rank == 0 else {}
    return {"loss": loss.detach(), "grads": grads, "logits": full_logits if rank == 0 else None}


def _worker(rank: int, world: int, port: int, out_dir: str, with_model: bool) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results: dict = {"cases": {}, "errors": {}}
        for case in _cases(world) + (_balance_cases() if world == 4 else []):
            results["cases"][case.name] = _run_case(case, rank, world)
        q, k, v, _ = _inputs(Case("x", "ulysses", "zigzag", "none", 8 * world, heads=8, kv_heads=2))
        for name, fn, extra in (
            ("ulysses-heads", ulysses_attention, {}),
            ("bad-layout", ring_attention, {"layout": "striped"}),
            ("bad-length", ring_attention, {"length": 3}),
        ):
            try:
                fn(q[:, :, :8], k[:, :, :8], v[:, :, :8], rope=ROPE, **extra)
                results["errors"][name] = None
            except LonglabError as error:
                results["errors"][name] = str(error)
        results["padded"] = _run_padded(rank, world)
        if with_model:
            results["model-ring"] = _run_model(rank, world, "selfextend:group=4,window=64", "ring", "zigzag", 301)
            results["model-ulysses"] = _run_model(rank, world, "yarn:factor=4", "ulysses", "zigzag", 301)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(world: int, tmp_path: Path, with_model: bool = False) -> list[dict]:
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path), with_model), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return _spawn(2, tmp_path_factory.mktemp("world2"), with_model=True)


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return _spawn(4, tmp_path_factory.mktemp("world4"))


def _reference(case: Case):
    q, k, v, grad = (x.requires_grad_() for x in _inputs(case))
    method = longlab.parse(case.spec)[0].resolve(ROPE)
    pos = torch.arange(case.length)[None].expand(case.batch, -1)
    out = segmented_attention(
        q, k, v, pos, pos, method.segments(), method.table(ROPE, case.length), 1 / math.sqrt(HEAD_DIM)
    )
    return out.detach(), torch.autograd.grad(out, (q, k, v), grad)


def _check_cases(results: list[dict], world: int) -> None:
    for case in _cases(world):
        layout = SequenceLayout(case.layout, world, case.length)
        shards = [r["cases"][case.name] for r in results]
        want_out, want_grads = _reference(case)
        got_out = layout.assemble([s["out"] for s in shards], dim=2)
        torch.testing.assert_close(got_out, want_out, atol=1e-5, rtol=0, msg=case.name)
        for i, want in enumerate(want_grads):
            got = layout.assemble([s["grads"][i] for s in shards], dim=2)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=f"{case.name} grad {'qkv'[i]}")


def _check_padded(results: list[dict], world: int) -> None:
    case, q, k, v, grad, valid, pos = _padded_inputs(world)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    method = longlab.parse(case.spec)[0].resolve(ROPE)
    table = method.table(ROPE, int(pos.max()) + 1)
    want = segmented_attention(q, k, v, pos, pos, method.segments(), table, 0.25, valid)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    layout = SequenceLayout("contiguous", world, case.length)
    for name in ("ring", "ulysses"):
        shards = [r["padded"][name] for r in results]
        torch.testing.assert_close(layout.assemble([s["out"] for s in shards], 2), want, atol=1e-5, rtol=0)
        for i, w in enumerate(want_grads):
            torch.testing.assert_close(layout.assemble([s["grads"][i] for s in shards], 2), w, atol=1e-4, rtol=0)


def _check_ring_bytes(results: list[dict], world: int) -> None:
    """Ring forward sends (N-1)/N of the global K+V per call; the backward K/V again plus dK/dV (N hops)."""
    for case in _cases(world):
        if case.algorithm != "ring":
            continue
        for r in results:
            s = r["cases"][case.name]
            local = s["local_kv_bytes"]
            padded_global = local * world
            assert s["forward"]["bytes_sent"]["kv"] == (world - 1) * padded_global // world
            assert s["total"]["bytes_sent"]["kv"] == 2 * (world - 1) * local
            assert s["total"]["bytes_sent"]["dkv"] == world * local  # float32 accumulators, float32 inputs


def _check_errors(results: list[dict], world: int) -> None:
    for r in results:
        errors = r["errors"]
        if world == 4:  # 8 query heads, 2 KV heads: 2 is not divisible by 4
            assert "divisible by the world size 4" in errors["ulysses-heads"]
        else:
            assert errors["ulysses-heads"] is None
        assert "unknown sequence layout 'striped'" in errors["bad-layout"]
        assert "pads to" in errors["bad-length"]


def test_world2_matches_single_process(world2):
    _check_cases(world2, 2)
    _check_padded(world2, 2)
    _check_ring_bytes(world2, 2)
    _check_errors(world2, 2)


def test_world4_matches_single_process(world4):
    _check_cases(world4, 4)
    _check_padded(world4, 4)
    _check_ring_bytes(world4, 4)
    _check_errors(world4, 4)


def test_zigzag_balances_causal_work(world4):
    """Zigzag: per-rank attention work within 5%; contiguous: the last rank does ~7x the first's."""
    zigzag = [r["cases"]["balance-zigzag"]["forward"]["forward_flops"] for r in world4]
    contiguous = [r["cases"]["balance-contiguous"]["forward"]["forward_flops"] for r in world4]
    assert (max(zigzag) - min(zigzag)) / max(zigzag) <= 0.05, zigzag
    assert max(contiguous) / min(contiguous) > 5, contiguous
    assert sum(zigzag) == pytest.approx(sum(contiguous), rel=0.01)  # same total causal work, spread differently
    backward = [r["cases"]["balance-zigzag"]["total"]["backward_flops"] for r in world4]
    assert (max(backward) - min(backward)) / max(backward) <= 0.05, backward


@pytest.mark.parametrize("key", ["model-ring", "model-ulysses"])
def test_bundled_model_loss_and_gradients_over_two_ranks(world2, key):
    model, _ = longlab.load("tiny", dtype=torch.float32)
    spec = "selfextend:group=4,window=64" if key == "model-ring" else "yarn:factor=4"
    longlab.apply(model, spec)
    ids = torch.randint(2, model.config.vocab_size, (1, 301), generator=torch.Generator().manual_seed(5))
    out = model(input_ids=ids, labels=ids, use_cache=False)  # transformers' own shifted mean loss
    out.loss.backward()
    for r in world2:
        torch.testing.assert_close(r[key]["loss"], out.loss.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(world2[0][key]["logits"], out.logits.detach(), atol=1e-4, rtol=0)
    grads = world2[0][key]["grads"]
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-4, rtol=0, msg=name)


def test_layout_split_and_assemble_round_trip():
    x = torch.arange(2 * 23).view(2, 23)
    for kind in ("zigzag", "contiguous"):
        for world in (1, 2, 3, 4):
            layout = SequenceLayout(kind, world, 23)
            shards = [layout.split(x, r) for r in range(world)]
            assert all(s.shape[1] == layout.local_length for s in shards)
            assert torch.equal(layout.assemble(shards), x)
            positions = torch.cat([layout.indices(r) for r in range(world)])
            assert sorted(positions.tolist()) == list(range(layout.padded_length))
    zigzag = SequenceLayout("zigzag", 2, 8)
    assert zigzag.indices(0).tolist() == [0, 1, 6, 7] and zigzag.indices(1).tolist() == [2, 3, 4, 5]


def test_clear_errors_without_process_group():
    with pytest.raises(LonglabError, match="unknown sequence layout"):
        SequenceLayout("diagonal", 2, 10)
    if not dist.is_initialized():
        q = torch.randn(1, 2, 8, HEAD_DIM)
        with pytest.raises(LonglabError, match="init_process_group"):
            ring_attention(q, q, q)
