"""Sequence parallelism against single-process attention: gloo ranks spawned on CPU, one thread each.

One spawn per world size runs every case (process start-up dominates); each rank writes its shards,
gradients and counters to a file and the parent compares them with the single-process kernel. The
ranks run longlab under :func:`_meta_by_default` (conftest's ``strict_device``, which fixtures cannot
hand to a spawned process), so a tensor made without its inputs' device fails there, as it would on
a GPU; single-rank groups in this process (gloo, or NCCL on a GPU) check the same on every device.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from longlab.attention import backends
from longlab.attention.kernel import partial_backward, partial_forward, plan, segmented_attention
from longlab.attention.merge import merge_into
from longlab.parallel import (
    SequenceLayout,
    count_pairs,
    distributed_backend,
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
MODEL_SPECS = {"model-ring": "selfextend:group=4,window=64", "model-ulysses": "yarn:factor=4"}  # key: mode
CPU = torch.device("cpu")
# (out, gradients) tolerances against the CPU reference: CUDA float32 takes the exact math backend,
# whose sums run in another order than the CPU flash op's
TOLERANCE = {"cpu": (1e-5, 1e-4), "cuda": (1e-4, 1e-3)}


@contextlib.contextmanager
def _meta_by_default():
    """conftest's ``strict_device`` for spawned ranks: a tensor made without a device lands on meta."""
    previous = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(previous)


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


def _run_case(case: Case, rank: int, world: int, device=CPU, guard=_meta_by_default) -> dict:
    """This rank's shard of ``case`` on ``device``, longlab's work under ``guard``; results on the CPU."""
    q, k, v, grad = (x.to(device) for x in _inputs(case))
    layout = SequenceLayout(case.layout, world, case.length)
    local = [layout.split(x, rank, dim=2).requires_grad_() for x in (q, k, v)]
    attention = ring_attention if case.algorithm == "ring" else ulysses_attention
    reset_stats()
    with guard():
        out = attention(
            *local, layout=case.layout, position=case.spec, rope=ROPE, length=case.length, block_size=case.block_size
        )
        forward = stats().as_dict()
        out.backward(layout.split(grad, rank, dim=2))
    return {
        "out": out.detach().cpu(),
        "grads": [x.grad.cpu() for x in local],
        "forward": forward,
        "total": stats().as_dict(),
        "local_kv_bytes": 2 * local[1].numel() * local[1].element_size(),
    }


def _padded_inputs(world: int, device=CPU):
    """Left-padded batch (row 1 starts with 21 padding tokens), positions as generate() assigns them."""
    case = Case("padded", "ring", "contiguous", SPECS[2], 32 * world, heads=8, kv_heads=4, seed=11)
    q, k, v, grad = _inputs(case)
    valid = torch.ones(case.batch, case.length, dtype=torch.bool)
    valid[1, :21] = False
    pos = (valid.long().cumsum(-1) - 1).masked_fill(~valid, 1)
    return (case, *(x.to(device) for x in (q, k, v, grad, valid, pos)))


def _run_padded(rank: int, world: int, device=CPU, guard=_meta_by_default) -> dict:
    """The kernel-level entry points with a padding mask: contiguous split, no padding at the end."""
    case, q, k, v, grad, valid, pos = _padded_inputs(world, device)
    layout = SequenceLayout("contiguous", world, case.length)
    method = longlab.parse(case.spec)[0].resolve(ROPE)
    table = method.table(ROPE, int(pos.max()) + 1)
    results = {}
    for name, fn in (("ring", ring_segmented_attention), ("ulysses", ulysses_segmented_attention)):
        local = [layout.split(x, rank, dim=2).requires_grad_() for x in (q, k, v)]
        p, m = layout.split(pos, rank), layout.split(valid, rank)
        with guard():
            out = fn(*local, p, p, method.segments(), table, 0.25, m, block_size=8)
            out.backward(layout.split(grad, rank, dim=2))
        results[name] = {"out": out.detach().cpu(), "grads": [x.grad.cpu() for x in local]}
    return results


def _run_model(
    rank: int, world: int, spec: str, algorithm: str, layout: str, length: int, device=CPU, guard=_meta_by_default
) -> dict:
    # use_cache is left to the model's default for Ulysses: shard() must turn the KV cache off
    model, _ = longlab.load("tiny", dtype=torch.float32)
    longlab.apply(model.to(device), spec)
    ids = torch.randint(2, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(5))
    ids = ids.to(device)
    with guard(), shard(model, layout=layout, mode=algorithm) as sp:
        local_ids, position_ids = sp.split(ids)
        cache = {"use_cache": False} if algorithm == "ring" else {}
        logits = model(input_ids=local_ids, position_ids=position_ids, **cache).logits
        loss = sp.loss(logits, sp.labels(ids))
        loss.backward()
        sp.all_reduce_gradients()
        full_logits = sp.gather(logits.detach())
    assert longlab.bridge.patch_of(model).attend is None and model.config.use_cache  # restored on exit
    grads = {name: p.grad.cpu() for name, p in model.named_parameters()} if rank == 0 else {}
    return {"loss": loss.detach().cpu(), "grads": grads, "logits": full_logits.cpu() if rank == 0 else None}


def _worker(rank: int, world: int, port: int, out_dir: str, with_model: bool, device_type: str = "cpu") -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if device_type == "cuda" else CPU
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = distributed_backend(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results: dict = {"cases": {}, "errors": {}}
        for case in _cases(world) + (_balance_cases() if world == 4 else []):
            results["cases"][case.name] = _run_case(case, rank, world, device)
        q, k, v, _ = (x.to(device) for x in _inputs(Case("x", "ulysses", "zigzag", "none", 8 * world, 8, 2)))
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
        results["padded"] = _run_padded(rank, world, device)
        if with_model:
            for key, spec in MODEL_SPECS.items():
                results[key] = _run_model(rank, world, spec, key.split("-")[1], "zigzag", 301, device)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(world: int, tmp_path: Path, with_model: bool = False, device_type: str = "cpu") -> list[dict]:
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path), with_model, device_type), nprocs=world, join=True)
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


def _check_cases(results: list[dict], world: int, cases: list[Case] | None = None, device_type: str = "cpu") -> None:
    out_tol, grad_tol = TOLERANCE[device_type]
    for case in cases or _cases(world):
        layout = SequenceLayout(case.layout, world, case.length)
        shards = [r["cases"][case.name] for r in results]
        want_out, want_grads = _reference(case)
        got_out = layout.assemble([s["out"] for s in shards], dim=2)
        torch.testing.assert_close(got_out, want_out, atol=out_tol, rtol=0, msg=case.name)
        for i, want in enumerate(want_grads):
            got = layout.assemble([s["grads"][i] for s in shards], dim=2)
            torch.testing.assert_close(got, want, atol=grad_tol, rtol=0, msg=f"{case.name} grad {'qkv'[i]}")


def _check_padded(results: list[dict], world: int, device_type: str = "cpu") -> None:
    out_tol, grad_tol = TOLERANCE[device_type]
    case, q, k, v, grad, valid, pos = _padded_inputs(world)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    method = longlab.parse(case.spec)[0].resolve(ROPE)
    table = method.table(ROPE, int(pos.max()) + 1)
    want = segmented_attention(q, k, v, pos, pos, method.segments(), table, 0.25, valid)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    layout = SequenceLayout("contiguous", world, case.length)
    for name in ("ring", "ulysses"):
        shards = [r["padded"][name] for r in results]
        torch.testing.assert_close(layout.assemble([s["out"] for s in shards], 2), want, atol=out_tol, rtol=0)
        for i, w in enumerate(want_grads):
            got = layout.assemble([s["grads"][i] for s in shards], 2)
            torch.testing.assert_close(got, w, atol=grad_tol, rtol=0)


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


def _check_model(results: list[dict], key: str, spec: str, length: int = 301, device_type: str = "cpu") -> None:
    """Sharded loss on every rank, gathered logits and reduced gradients against the whole model."""
    out_tol, grad_tol = TOLERANCE[device_type]
    model, _ = longlab.load("tiny", dtype=torch.float32)
    longlab.apply(model, spec)
    ids = torch.randint(2, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(5))
    out = model(input_ids=ids, labels=ids, use_cache=False)  # transformers' own shifted mean loss
    out.loss.backward()
    for r in results:
        torch.testing.assert_close(r[key]["loss"], out.loss.detach(), atol=out_tol, rtol=0)
    torch.testing.assert_close(results[0][key]["logits"], out.logits.detach(), atol=grad_tol, rtol=0)
    grads = results[0][key]["grads"]
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=grad_tol, rtol=0, msg=name)


@pytest.mark.parametrize("key", list(MODEL_SPECS))
def test_bundled_model_loss_and_gradients_over_two_ranks(world2, key):
    _check_model(world2, key, MODEL_SPECS[key])


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


# -- one rank in this process, on every device: nothing created off the inputs' device -----------


@pytest.fixture
def one_rank(device):
    """A process group of this process alone, with the backend for ``device`` (gloo, or NCCL on a GPU)."""
    if dist.is_initialized():
        pytest.skip("this process already belongs to a process group")
    init = f"tcp://127.0.0.1:{_free_port()}"
    dist.init_process_group(distributed_backend(device), init_method=init, rank=0, world_size=1)
    try:
        yield device
    finally:
        dist.destroy_process_group()


ONE_RANK_CASES = [
    Case("ring-zigzag-selfextend", "ring", "zigzag", SPECS[3], 101, block_size=16),
    Case("ring-contiguous-yarn", "ring", "contiguous", SPECS[1], 64),
    Case("ulysses-zigzag-rerope", "ulysses", "zigzag", SPECS[2], 99, 8, 4, block_size=32, seed=3),
    Case("ulysses-contiguous-none", "ulysses", "contiguous", SPECS[0], 70, seed=4),
]


@pytest.mark.parametrize("case", ONE_RANK_CASES, ids=[c.name for c in ONE_RANK_CASES])
def test_one_rank_attention_creates_no_tensor_off_the_inputs_device(one_rank, strict_device, case):
    """ring / Ulysses forward and backward on the group's device under ``strict_device``, equal to the
    single-process kernel; the counters see the work and nothing sent."""
    result = _run_case(case, 0, 1, one_rank, strict_device)
    _check_cases([{"cases": {case.name: result}}], 1, [case], one_rank.type)
    assert result["total"]["forward_pairs"] > 0 and result["total"]["backward_pairs"] > 0
    assert result["total"]["total_bytes"] == 0  # one rank: every exchange is with itself, none is sent


def test_one_rank_padded_entry_points_create_no_tensor_off_the_inputs_device(one_rank, strict_device):
    _check_padded([{"padded": _run_padded(0, 1, one_rank, strict_device)}], 1, one_rank.type)


@pytest.mark.parametrize(
    "algorithm,spec", [("ring", "selfextend:group=4,window=64"), ("ulysses", "yarn:factor=4+logn")]
)
def test_one_rank_sharded_model_creates_no_tensor_off_the_inputs_device(one_rank, strict_device, algorithm, spec):
    """shard(model): split, labels, forward, loss, backward, gradient all-reduce and gather."""
    results = [{"model": _run_model(0, 1, spec, algorithm, "zigzag", 75, one_rank, strict_device)}]
    _check_model(results, "model", spec, 75, one_rank.type)


def test_one_rank_layout_gather_and_work_counts_stay_on_the_device(one_rank, strict_device):
    x = torch.arange(2 * 23, device=one_rank).view(2, 23)
    layout = SequenceLayout("zigzag", 1, 23)
    segments = longlab.parse("rerope:window=8")[0].segments()
    pos = torch.arange(24, device=one_rank)[None]
    planned = plan(pos, pos, None, segments, 8)
    with strict_device():
        local = layout.split(x, 0)
        assert local.device == x.device and torch.equal(layout.gather(local), x)
        assert torch.equal(layout.assemble([local]), x)
        assert layout.valid(0).tolist() == [True] * 23 + [False]
        pairs = count_pairs(planned, segments)
    assert pairs == count_pairs(planned, segments) > 0


def test_ring_building_blocks_create_no_tensor_off_the_inputs_device(strict_device, device):
    """What each ring step runs: partial forward over one key block, merged by log-sum-exp with the
    next, and each block's share of the gradients from the final (out, lse), summed."""
    case = Case("blocks", "ring", "contiguous", SPECS[3], 96, seed=5)
    q, k, v, grad = (x.to(device) for x in _inputs(case))
    method = longlab.parse(case.spec)[0].resolve(ROPE)
    table = method.table(ROPE, case.length)
    table = dataclasses.replace(table, inv_freq=table.inv_freq.to(device))
    pos = torch.arange(case.length, device=device)[None].expand(case.batch, -1)
    # rank 1 of a contiguous 2-rank ring: its queries (the second half) against both key blocks
    halves = (slice(0, 48), slice(48, 96))
    q, grad, q_pos = q[:, :, 48:], grad[:, :, 48:], pos[:, 48:]
    segments = method.segments()
    with strict_device():
        layouts = [plan(q_pos, pos[:, h], None, segments, 16) for h in halves]
        pieces = [
            partial_forward(q, k[:, :, h], v[:, :, h], q_pos, pos[:, h], None, segments, table, 0.25, lay)
            for h, lay in zip(halves, layouts, strict=True)
        ]
        acc, lse = pieces[0]
        merge_into(acc, lse, *pieces[1])
        out = acc.to(q.dtype)
        shares = [
            partial_backward(
                grad, q, k[:, :, h], v[:, :, h], q_pos, pos[:, h], None, segments, table, 0.25, lay, out, lse
            )
            for h, lay in zip(halves, layouts, strict=True)
        ]
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    want = segmented_attention(q, k, v, q_pos, pos, segments, table, 0.25)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    out_tol, grad_tol = TOLERANCE[device.type]
    torch.testing.assert_close(out, want.detach(), atol=out_tol, rtol=0)
    torch.testing.assert_close(shares[0][0] + shares[1][0], want_grads[0], atol=grad_tol, rtol=0)
    for i in (1, 2):  # dk, dv: each block's share is its own keys' gradient
        got = torch.cat([shares[0][i], shares[1][i]], dim=2)
        torch.testing.assert_close(got, want_grads[i], atol=grad_tol, rtol=0)


def test_ring_and_ulysses_plan_with_the_backend_of_the_inputs_device(one_rank, monkeypatch):
    """The planner's blocks are the device's backend's (large on a GPU), not the CPU's: here a
    backend with blocks of 16 stands in for the device's, and the result stays exact."""
    from longlab.parallel import ring, ulysses

    monkeypatch.setitem(backends.BACKENDS, one_rank.type, lambda dtype, head_dim: dataclasses.replace(
        backends.MATH, block_size=16))  # fmt: skip
    sizes = []
    for module in (ring, ulysses):
        original = module.plan
        monkeypatch.setattr(
            module, "plan", lambda *a, original=original: sizes.append(original(*a).size) or original(*a)
        )
    cases = [dataclasses.replace(c, block_size=None) for c in ONE_RANK_CASES[::2]]  # ring and ulysses, not plain
    results = {c.name: _run_case(c, 0, 1, one_rank, contextlib.nullcontext) for c in cases}
    _check_cases([{"cases": results}], 1, cases, "cuda")  # the math backend's rounding, as on a GPU
    assert sizes and set(sizes) == {16}


def test_process_group_and_tensors_on_different_devices_are_refused(one_rank):
    """gloo moves CPU tensors, NCCL CUDA ones: the other device is refused before any message."""
    other = "meta" if one_rank.type == "cpu" else "cpu"
    q = torch.randn(1, 2, 8, HEAD_DIM, device=other)
    backend = distributed_backend(one_rank)
    with pytest.raises(LonglabError, match=rf"backend is {backend}, which moves {one_rank.type} tensors only"):
        ring_attention(q, q, q, rope=ROPE)
    with pytest.raises(LonglabError, match=rf"backend is {backend}"):
        SequenceLayout("contiguous", 1, 8).gather(q)
    pos = torch.arange(8, device=one_rank)[None]
    with pytest.raises(LonglabError, match=rf"q on {other}.*q_pos on {one_rank.type}"):  # named, as the kernel does
        ring_segmented_attention(q, q, q, pos, pos, longlab.parse("none")[0].segments(), None, 1.0)


def test_distributed_backend_follows_the_device():
    assert distributed_backend("cpu") == "gloo"
    if dist.is_nccl_available():
        assert distributed_backend("cuda:0") == "nccl"
    else:
        with pytest.raises(LonglabError, match="needs NCCL"):
            distributed_backend("cuda")
    with pytest.raises(LonglabError, match="runs on cpu \\(gloo\\) or cuda \\(nccl\\); got tensors on 'mps'"):
        distributed_backend("mps")


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank: two ranks, two GPUs")
def test_two_gpus_over_nccl_match_single_process(tmp_path):
    results = _spawn(2, tmp_path, with_model=True, device_type="cuda")
    _check_cases(results, 2, device_type="cuda")
    _check_padded(results, 2, "cuda")
    _check_ring_bytes(results, 2)
    for key, spec in MODEL_SPECS.items():
        _check_model(results, key, spec, device_type="cuda")
