"""Device-generic attention: backends, no tensor created off the inputs' device, clear device errors,
and (where a GPU exists) every method on CUDA equal to the CPU result."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import longlab
from longlab.attention import backends, band
from longlab.attention.backends import CPU, CUDNN, MATH, backend_for
from longlab.attention.kernel import segmented_attention
from longlab.errors import LonglabError
from longlab.positions.rope import FrequencyTable
from support import reference
from support.models import build

# every position method, with parameters that make each one differ from plain RoPE at length 150
POSITION_SPECS = [
    "none", "linear:factor=4", "ntk:factor=4", "dynamic_ntk:factor=2", "yarn:factor=4", "dynamic_yarn",
    "llama3:factor=8", "longrope:factor=4", "power", "truncation", "rerope:window=20",
    "leaky_rerope:window=16,k=3", "selfextend:group=3,window=16", "lm_infinite:band=32,n_global=4",
    "sliding:size=40", "yarn:factor=4+logn", "string:shift=30,window=4", "dca:chunk_size=40,local_window=8",
]  # fmt: skip


def _padded_ids(batch=2, length=150):
    ids = torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :37] = 0
    return ids, mask


def _pieces(dtype, m=70, n=90, heads=8, kv_heads=2, head_dim=16, device="cpu"):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(2, heads, m, head_dim, dtype=dtype, device=device, generator=g)
    k = torch.randn(2, kv_heads, n, head_dim, dtype=dtype, device=device, generator=g)
    v = torch.randn(2, kv_heads, n, head_dim, dtype=dtype, device=device, generator=g)
    allowed = torch.rand(2, 1, m, n, device=device, generator=g) > 0.4
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, -math.inf)
    return q, k, v, mask


@pytest.mark.parametrize("causal,masked", [(True, False), (False, True), (False, False)])
def test_math_backend_equals_cpu_flash_forward_and_backward(causal, masked):
    """The exact math path (CUDA float32) agrees with PyTorch's CPU flash op, gradients included."""
    q, k, v, mask = _pieces(torch.float64, m=64, n=64)
    mask = mask if masked else None
    out, lse = MATH.forward(q, k, v, 0.3, causal, mask)
    want_out, want_lse = CPU.forward(q, k, v, 0.3, causal, mask)
    torch.testing.assert_close(out, want_out, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(lse.double(), want_lse.double(), atol=1e-10, rtol=1e-9)
    grad = torch.randn_like(out)
    got = MATH.backward(grad, q, k, v, out, lse, 0.3, causal, mask)
    want = CPU.backward(grad, q, k, v, want_out, want_lse, 0.3, causal, mask)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w.double(), atol=1e-9, rtol=1e-8)


@pytest.mark.parametrize("spec,name,params", [
    ("rerope:window=40", "rerope", {"window": 40}),
    ("selfextend:group=4,window=24", "selfextend", {"group": 4, "window": 24}),
    ("lm_infinite:band=40,n_global=5", "lm_infinite", {"band": 40, "n_global": 5, "original_length": 64}),
    ("string:shift=40,window=8", "string", {"shift": 40, "window": 8}),
    ("dca:chunk_size=30,local_window=6", "dca", {"chunk_size": 30, "local_window": 6}),
])  # fmt: skip
def test_kernel_on_the_math_backend_matches_reference(monkeypatch, spec, name, params):
    """The whole segmented kernel (plan, merge, backward) run through another backend than the CPU's
    flash op stays exact: forward and gradients against the naive O(L^2) reference, with padding."""
    monkeypatch.setitem(backends.BACKENDS, "cpu", lambda dtype, head_dim: MATH)
    length, dim = 150, 16
    q, k, v = (torch.randn(2, h, length, dim, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[1, :43] = False
    pos = (valid.long().cumsum(-1) - 1).masked_fill(~valid, 1)
    rope = longlab.positions.RopeConfig(dim, 10000.0, 64, reference.inv_freq(dim))
    method = longlab.parse(spec)[0].resolve(rope)
    ours = segmented_attention(q, k, v, pos, pos, method.segments(), method.table(rope, length), 0.25, valid, 32)
    rows = []
    for b in range(2):
        visible, rel = reference.distances(name, pos[b], pos[b], **params)
        rows.append(reference.attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], visible, rel,
                                        reference.inv_freq(dim), 0.25, 1.0, valid[b : b + 1]))  # fmt: skip
    ref = torch.cat(rows)
    real = valid[:, None, :, None].expand_as(ref)
    torch.testing.assert_close(ours[real], ref[real], atol=1e-10, rtol=1e-9)
    grad = torch.randn_like(ref) * real
    for g, w in zip(torch.autograd.grad(ours, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad), strict=True):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-8)


def _bottom_right_band_mask(q, k, window):
    m, n = q.shape[2], k.shape[2]
    rows = torch.arange(m)[:, None] + (n - m)  # bottom-right alignment: the last query sees the last key
    cols = torch.arange(n)[None]
    allowed = (cols <= rows) & ((cols >= rows - window) if window is not None else True)
    return torch.zeros(m, n, dtype=q.dtype).masked_fill(~allowed, -math.inf).expand(q.shape[0], 1, m, n)


# What FlashAttention-2's bottom-right causal window computes, written as an explicit mask (tests only).
REFERENCE_BANDS = dataclasses.replace(
    MATH,
    band_forward=lambda q, k, v, scale, window: MATH.forward(
        q, k, v, scale, False, _bottom_right_band_mask(q, k, window)
    ),
    band_backward=lambda g, q, k, v, out, lse, scale, window: MATH.backward(
        g, q, k, v, out, lse, scale, False, _bottom_right_band_mask(q, k, window)
    ),
)

BAND_CASES = [  # a plain segment keeps the plan's single causal call
    ("rerope:window=40", "rerope", {"window": 40}),
    ("leaky_rerope:window=32,k=4", "leaky_rerope", {"window": 32, "k": 4.0}),
    ("selfextend:group=4,window=24", "selfextend", {"group": 4, "window": 24}),
    ("sliding:size=30", "sliding", {"size": 30}),
    ("string:shift=40,window=8", "string", {"shift": 40, "window": 8}),
]


@pytest.mark.parametrize("spec,name,params", BAND_CASES, ids=[c[0] for c in BAND_CASES])
@pytest.mark.parametrize("tail", [None, 1, 7, 45])  # prefill; decoding; short and long chunked-prefill tails
def test_band_schedule_of_contiguous_calls_matches_reference(monkeypatch, spec, name, params, tail):
    """Contiguous calls take band pieces (full rectangles, causal squares, windowed bands) instead of
    masked blocks: forward and gradients equal the naive reference, over several query chunks."""
    monkeypatch.setitem(backends.BACKENDS, "cpu", lambda dtype, head_dim: REFERENCE_BANDS)
    monkeypatch.setattr(band, "ROWS", 32)
    monkeypatch.setattr(band, "SMALL", 4)
    length, dim = 150, 16
    q, k, v = (torch.randn(2, h, length, dim, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    pos = torch.arange(length)[None].expand(2, -1) + torch.tensor([[0], [5]])  # each row its own start
    rope = longlab.positions.RopeConfig(dim, 10000.0, 64, reference.inv_freq(dim))
    method = longlab.parse(spec)[0].resolve(rope)
    rows = slice(length - tail if tail else 0, length)
    calls = []
    monkeypatch.setattr(band, "pieces", lambda *a, original=band.pieces: calls.append(1) or original(*a))
    ours = segmented_attention(q[:, :, rows], k, v, pos[:, rows], pos, method.segments(), method.table(rope, 160), 0.25)
    assert calls, "a contiguous call on a backend with bands takes the band schedule"
    refs = []
    for b in range(2):
        visible, rel = reference.distances(name, pos[b], pos[b], **params)
        refs.append(reference.attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], visible, rel,
                                        reference.inv_freq(dim), 0.25, 1.0))  # fmt: skip
    ref = torch.cat(refs)[:, :, rows]
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-9)
    grad = torch.randn_like(ref)
    for g, w in zip(torch.autograd.grad(ours, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad), strict=True):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-8)


@pytest.mark.parametrize("spec", POSITION_SPECS)
def test_forward_and_backward_create_no_tensor_off_the_inputs_device(strict_device, spec):
    """Under ``strict_device`` a tensor made without the inputs' device lands on meta and any use of it
    with the model's real tensors raises: forward and backward of every method, padded batch."""
    model = build()
    longlab.apply(model, spec)
    ids, mask = _padded_ids()
    with strict_device():
        loss = model(ids, attention_mask=mask, use_cache=False).logits.float().logsumexp(-1).mean()
        loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_inputs_on_another_device_fail_before_any_work():
    model = build()
    longlab.apply(model, "yarn:factor=4")
    ids = torch.randint(3, 128, (1, 20), device="meta")
    with pytest.raises(LonglabError, match=r"model is on cpu but input_ids on meta"):
        model(ids)
    longlab.reset(model)
    assert not model._forward_pre_hooks  # reset removes the check with the rest of the patch


def test_kernel_inputs_on_different_devices_name_each_device():
    q = torch.randn(1, 2, 8, 16)
    k = torch.randn(1, 2, 8, 16, device="meta")
    pos = torch.arange(8)[None]
    with pytest.raises(LonglabError, match=r"q on cpu, k on meta"):
        segmented_attention(q, k, k, pos, pos, longlab.parse("none")[0].segments(), FrequencyTable(torch.ones(8)), 1.0)


@pytest.mark.parametrize("device", ["mps", "xpu"])
def test_unsupported_device_is_refused_naming_the_supported_ones(device):
    with pytest.raises(LonglabError, match=rf"runs on cpu, cuda; got tensors on '{device}'"):
        backend_for(device, torch.float32, 64)


def test_backend_table_by_device_dtype_and_head_size():
    assert backend_for("cpu", torch.bfloat16, 128) is CPU
    assert CPU.band_forward is None and MATH.band_forward is None  # blockwise plans only
    assert backend_for("cuda", torch.bfloat16, 128) is CUDNN
    assert backend_for("cuda:1", torch.float16, 64) is CUDNN
    assert backend_for("cuda", torch.float32, 128) is MATH  # cuDNN's fused kernel is half precision only
    assert backend_for("cuda", torch.bfloat16, 100) is MATH  # head size not a multiple of 8
    model = build()
    longlab.apply(model, "none")
    assert "attention on cpu float32: cpu/flash" in longlab.describe(model)


# -- on a GPU -----------------------------------------------------------------------------------


def _logits_and_grads(model, ids, mask):
    model.zero_grad()
    out = model(ids, attention_mask=mask, use_cache=False).logits
    out.float().logsumexp(-1).mean().backward()
    grads = {name: p.grad.detach().cpu() for name, p in model.named_parameters() if p.grad is not None}
    return out.detach().cpu(), grads


@pytest.mark.cuda
@pytest.mark.parametrize("spec", POSITION_SPECS)
def test_every_method_on_cuda_equals_cpu(spec):
    """float32, padded batch: logits and every parameter's gradient on CUDA equal the CPU's."""
    ids, mask = _padded_ids()
    cpu_model = longlab.apply(build(), spec)
    cuda_model = longlab.apply(build().cuda(), spec)
    want_logits, want_grads = _logits_and_grads(cpu_model, ids, mask)
    got_logits, got_grads = _logits_and_grads(cuda_model, ids.cuda(), mask.cuda())
    real = mask.bool()
    torch.testing.assert_close(got_logits[real], want_logits[real], atol=1e-4, rtol=1e-4)
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, atol=1e-4, rtol=1e-3, msg=name)
    with torch.no_grad():
        want = cpu_model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        got = cuda_model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=8, do_sample=False)
    assert torch.equal(got.cpu(), want)


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
def test_none_on_cuda_equals_the_unpatched_model(family):
    model = build(family).cuda()
    ids, mask = (t.cuda() for t in _padded_ids())
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        longlab.apply(model, "none")
        after = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(after[real], before[real], atol=1e-4, rtol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("queries", [1, 128])  # decoding-sized pieces take FlashAttention-2 or math
@pytest.mark.parametrize("causal,masked", [(True, False), (False, True), (False, False)])
def test_cudnn_backend_equals_math_forward_and_backward(causal, masked, queries):
    n = queries if causal else 200
    q, k, v, mask = _pieces(torch.bfloat16, m=queries, n=n, head_dim=64, device="cuda")
    mask = mask if masked else None
    out, lse = CUDNN.forward(q, k, v, 0.125, causal, mask)
    want_out, want_lse = MATH.forward(q, k, v, 0.125, causal, mask)
    torch.testing.assert_close(out.float(), want_out.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, want_lse, atol=1e-3, rtol=1e-3)
    grad = torch.randn_like(out)
    got = CUDNN.backward(grad, q, k, v, out, lse, 0.125, causal, mask)
    want = MATH.backward(grad, q, k, v, out, lse, 0.125, causal, mask)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.float(), w.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("spec", ["none", "rerope:window=20", "selfextend:group=3,window=16", "sliding:size=40"])
def test_bfloat16_on_cuda_padded_batches_have_no_nan(spec):
    model = longlab.apply(build().cuda().to(torch.bfloat16), spec)
    ids, mask = (t.cuda() for t in _padded_ids())
    mask[0, :149] = 0  # a row holding a single real token
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.isfinite(logits[mask.bool()]).all()
    assert tokens.shape == (2, 154)


@pytest.mark.cuda
@pytest.mark.parametrize("spec", ["none", "rerope:window=65536", "selfextend:group=32,window=2048"])
def test_bfloat16_kernel_at_128k_tokens_is_finite_forward_and_backward(spec):
    length, dim = 131072, 64
    q, k, v = (
        torch.randn(1, h, length, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (4, 2, 2)
    )
    pos = torch.arange(length, device="cuda")[None]
    rope = longlab.positions.RopeConfig(dim, 500000.0, 8192, reference.inv_freq(dim, 500000.0).float())
    method = longlab.parse(spec)[0].resolve(rope)
    out = segmented_attention(q, k, v, pos, pos, method.segments(), method.table(rope, length), dim**-0.5)
    out.float().square().mean().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in (q, k, v))


CACHE_SPECS = [
    "full", "window:budget=40", "streaming:sinks=4,window=36", "h2o:budget=40", "tova:budget=40",
    "snapkv:budget=40", "snapkv:budget=40,pooling=max", "pyramidkv:budget=40", "knorm:budget=40",
    "random:budget=40", "adakv:budget=40", "kv_int8", "kv_int4", "snapkv:budget=40,chunk=32",
    "selfextend:group=4,window=16+h2o:ratio=0.5",
]  # fmt: skip


def _generate_with_stats(model, ids, mask):
    with torch.no_grad():
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    stats = longlab.cache_stats(model)
    return tokens.cpu(), [layer.tokens for layer in stats.layers], stats.bytes_held


@pytest.mark.parametrize("spec", CACHE_SPECS)
def test_every_cache_policy_creates_no_tensor_off_the_inputs_device(strict_device, spec):
    """Prefill, eviction, quantization, chunked prefill, decoding and cache_stats, padded batch."""
    model = longlab.apply(build(), spec)
    ids, mask = _padded_ids()
    with strict_device():
        tokens, kept, held = _generate_with_stats(model, ids, mask)
    assert tokens.shape == (2, 155) and held > 0 and all(n > 0 for layer in kept for row in layer for n in row)


@pytest.mark.cuda
@pytest.mark.parametrize("spec", CACHE_SPECS)
def test_every_cache_policy_on_cuda_equals_cpu(spec):
    """float32: the same tokens generated, the same entries kept per head, the same bytes held."""
    ids, mask = _padded_ids()
    want = _generate_with_stats(longlab.apply(build(), spec), ids, mask)
    got = _generate_with_stats(longlab.apply(build().cuda(), spec), ids.cuda(), mask.cuda())
    assert torch.equal(got[0], want[0])
    assert got[1:] == want[1:]


# -- evaluation on a device ---------------------------------------------------------------------


@pytest.mark.parametrize("asked", ["mps", "xpu", "tpu"])
def test_eval_refuses_an_unsupported_device_before_any_work(tmp_path, capsys, asked):
    from longlab.cli import main

    assert main(["eval", "--device", asked, "--out", str(tmp_path / "run"), "--lengths", "256"]) == 2
    assert f"device '{asked}' is not supported; use auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_eval_on_cuda_without_a_gpu_says_so():
    from longlab.loading import resolve_device

    with pytest.raises(LonglabError, match="no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_cuda_index_beyond_the_gpus_is_refused(monkeypatch):
    from longlab.loading import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(LonglabError, match=r"device 'cuda:2' asked for, but this machine has 2 GPU\(s\): cuda:0..1"):
        resolve_device("cuda:2")


def test_torchrun_processes_take_one_gpu_each_and_every_nth_cell(monkeypatch):
    from longlab.eval.runner import Ranks

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ranks = Ranks.from_environment()
    assert (ranks.rank, ranks.world, ranks.local_rank) == (3, 4, 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert ranks.device(torch.device("cuda")) == torch.device("cuda", 1)  # cuda / auto: cuda:LOCAL_RANK
    assert ranks.device(torch.device("cuda", 0)) == torch.device("cuda", 0)  # an explicit index is kept
    assert ranks.device(torch.device("cpu")) == torch.device("cpu")
    assert Ranks().device(torch.device("cuda")) == torch.device("cuda")  # one process: as asked
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(LonglabError, match=r"needs cuda:1, but this machine has 1 GPU"):
        ranks.device(torch.device("cuda"))


def test_memory_helpers_on_the_cpu():
    from longlab.eval import memory

    memory.reset_peak("cpu")
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    peak = memory.peak_bytes("cpu")
    assert peak is None or peak >= block.numel() * 4
    assert memory.available_bytes("cpu") > 0


@pytest.mark.cuda
def test_memory_helpers_on_cuda_read_the_allocator():
    from longlab.eval import memory

    device = torch.device("cuda")
    memory.reset_peak(device)
    before = torch.cuda.memory_allocated(device)
    block = torch.ones(64 * 2**20 // 4, device=device)
    assert memory.peak_bytes(device) >= before + block.numel() * 4
    assert 0 < memory.available_bytes(device) <= torch.cuda.get_device_properties(device).total_memory


@pytest.mark.parametrize("spec", [None, "selfextend:group=4,window=64+snapkv:budget=200"])
def test_generation_helpers_create_no_tensor_off_the_models_device(strict_device, spec):
    from longlab.eval.generation import token_losses
    from longlab.generation import generate_answers

    model, tokenizer = longlab.load("tiny")
    if spec:
        longlab.apply(model, spec)
    prompts = [tokenizer("The pass key is 12345. Remember it.", return_tensors="pt")["input_ids"] for _ in range(2)]
    prompts[1] = prompts[1][:, 3:]  # a shorter prompt: the batch is left-padded
    with strict_device():
        answers = generate_answers(model, tokenizer, prompts, 4)
        losses = token_losses(model, torch.cat(prompts[:1] * 20, dim=1), chunk=64)
    assert len(answers) == 2 and losses.shape == (prompts[0].shape[1] * 20 - 1,) and torch.isfinite(losses).all()


@pytest.mark.cuda
def test_eval_on_cuda_in_bfloat16_records_device_and_memory(tmp_path):
    from longlab.eval.runner import EvalConfig, run

    out = run(EvalConfig(out=str(tmp_path), methods=["yarn:factor=2"], tasks=["passkey", "ppl"], lengths=[512],
                         samples=2, device="cuda", dtype="bfloat16"))  # fmt: skip
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert rows and all(r["device"] == "cuda" and r["dtype"] == "bfloat16" and r["peak_memory_mb"] > 0 for r in rows)
    assert json.loads((out / "runs.jsonl").read_text().splitlines()[-1])["dtype"] == "bfloat16"


@pytest.mark.cuda
@pytest.mark.parametrize("m,n,window", [(128, 128, None), (96, 300, None), (128, 200, 37), (1, 500, None), (64, 64, 5)])
def test_flashattention_bands_equal_the_masked_reference(m, n, window):
    """The CUDA backend's band op (FlashAttention-2, bottom-right causal, sliding window) against the
    explicit-mask definition the band schedule assumes, forward and backward."""
    q, k, v, _ = _pieces(torch.bfloat16, m=m, n=n, head_dim=64, device="cuda")
    out, lse = CUDNN.band_forward(q, k, v, 0.125, window)
    mask = _bottom_right_band_mask(q.cpu(), k.cpu(), window).cuda()
    want_out, want_lse = MATH.forward(q, k, v, 0.125, False, mask)
    torch.testing.assert_close(out.float(), want_out.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, want_lse, atol=1e-3, rtol=1e-3)
    grad = torch.randn_like(out)
    got = CUDNN.band_backward(grad, q, k, v, out, lse, 0.125, window)
    want = MATH.backward(grad, q, k, v, out, lse, 0.125, False, mask)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.float(), w.float(), atol=5e-2, rtol=5e-2)
