"""longlab on one GPU vs PyTorch and the unpatched transformers model, side by side (ratios).

Three parts, each printing a table (time and peak extra GPU memory, ratio to the reference):

- ``kernel``: attention alone, bf16, Llama-3-8B shape (32 query / 8 KV heads, head dim 128), batch 1.
  Reference: ``F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` on q, k already
  rotated; longlab gets unrotated q, k and rotates them itself. Forward, and forward + backward.
- ``prefill``: a Llama-3-8B-shaped model (random bf16 weights built from its config, 32 layers),
  one prompt, keeping only the last logits. Reference: the unpatched model (sdpa).
- ``snapkv``: ``snapkv:budget=2048,chunk=4096`` vs the full cache at the longest length: prefill
  peak memory, cache bytes, and decode tokens/s vs the unpatched model's full-cache decode.

    python benchmarks/gpu.py                       # everything, 32k and 128k
    python benchmarks/gpu.py --parts kernel --lengths 32k
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
import torch.nn.functional as F

import longlab
from longlab.attention.kernel import segmented_attention
from longlab.positions.rope import FrequencyTable, RopeConfig, base_inv_freq, rotate

HEADS, KV_HEADS, HEAD_DIM, THETA, L_TRAIN = 32, 8, 128, 500000.0, 8192
KERNEL_SPECS = ["none", "rerope:window=4096", "selfextend:group=16,window=2048"]
PREFILL_SPECS = ["yarn:factor=16", "selfextend:group=16,window=2048"]


def _length(text: str) -> int:
    return int(float(text[:-1]) * 1024) if text.lower().endswith("k") else int(text)


def measure(run, repeats: int) -> tuple[float, float]:
    """Median seconds of ``run()`` and its peak GPU memory beyond what was allocated before it."""
    run()  # warm-up: cuDNN plans, allocator pools
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), torch.cuda.max_memory_allocated() - before


def _row(name: str, seconds: float, extra: float, ref: tuple[float, float] | None) -> str:
    ratio = "" if ref is None else f" ({seconds / ref[0]:.2f}×)"
    mem_ratio = "" if ref is None else f" ({extra / max(ref[1], 1):.2f}×)"
    return f"| {name} | {seconds * 1e3:.1f} ms{ratio} | {extra / 2**20:.0f} MiB{mem_ratio} |"


def kernel(lengths: list[int], repeats: int) -> None:
    print("\n## kernel: bf16, 32 query / 8 KV heads, head dim 128, batch 1 (ratio to SDPA on pre-rotated q, k)\n")
    rope = RopeConfig(HEAD_DIM, THETA, L_TRAIN, base_inv_freq(HEAD_DIM, THETA))
    table = FrequencyTable(rope.native_inv_freq)
    for length in lengths:
        torch.manual_seed(0)
        q = torch.randn(1, HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, KV_HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, KV_HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        pos = torch.arange(length, device="cuda")[None]
        q_rot, k_rot = rotate(q, pos, table), rotate(k, pos, table)
        print(f"| L = {length} | forward | peak extra memory | forward + backward | peak extra memory |")
        print("|---|---|---|---|---|")

        def sdpa(q_in, k_in, v_in):
            return F.scaled_dot_product_attention(q_in, k_in, v_in, is_causal=True, enable_gqa=True)

        rows = {"sdpa (reference)": lambda q_in, k_in, v_in: sdpa(q_in, k_in, v_in)}
        inputs = {"sdpa (reference)": (q_rot, k_rot, v)}
        for spec in KERNEL_SPECS:
            method = longlab.parse(spec)[0].resolve(rope)
            segments, spec_table = method.segments(), method.table(rope, length)

            def ours(q_in, k_in, v_in, segments=segments, spec_table=spec_table, pos=pos):
                return segmented_attention(q_in, k_in, v_in, pos, pos, segments, spec_table, HEAD_DIM**-0.5)

            rows[f"longlab {spec}"] = ours
            inputs[f"longlab {spec}"] = (q, k, v)
        ref_f = ref_b = None
        for name, fn in rows.items():
            args = inputs[name]
            fwd = measure(lambda fn=fn, args=args: fn(*args), repeats)
            grads = [t.detach().requires_grad_() for t in args]
            bwd = measure(lambda fn=fn, grads=grads: fn(*grads).backward(torch.ones_like(grads[0])), repeats)
            ref_f, ref_b = ref_f or fwd, ref_b or bwd
            cell_f = _row(name, *fwd, None if name.startswith("sdpa") else ref_f)
            cell_b = _row("", *bwd, None if name.startswith("sdpa") else ref_b)
            print(cell_f + cell_b.removeprefix("| "), flush=True)
            del grads
        del q, k, v, q_rot, k_rot
        gc.collect()
        torch.cuda.empty_cache()


def _llama3_8b():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=L_TRAIN,
        rope_parameters={"rope_type": "default", "rope_theta": THETA}, attn_implementation="sdpa",
    )  # fmt: skip
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: 16 GB of weights, not 32 first
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    return model


@torch.no_grad()
def prefill(lengths: list[int], repeats: int, model) -> None:
    print("\n## prefill: Llama-3-8B shape, random bf16 weights, last logits only (ratio to the unpatched model)\n")
    print("| L | method | time | peak extra memory |")
    print("|---|---|---|---|")
    for length in lengths:
        ids = torch.randint(0, 128000, (1, length), device="cuda")

        def run(ids=ids):
            return model(ids, logits_to_keep=1).logits

        longlab.reset(model)
        ref = measure(run, repeats)
        print(f"| {length} " + _row("unpatched (sdpa)", *ref, None), flush=True)
        for spec in PREFILL_SPECS:
            longlab.apply(model, spec)
            print(f"| {length} " + _row(f"longlab {spec}", *measure(run, repeats), ref), flush=True)
        longlab.reset(model)


@torch.no_grad()
def snapkv(length: int, model, new_tokens: int) -> None:
    print(f"\n## snapkv at {length} tokens: prefill memory, cache bytes, decode speed (ratio to full)\n")
    print("| method | prefill | peak extra memory | cache bytes | decode tokens/s |")
    print("|---|---|---|---|---|")
    ids = torch.randint(0, 128000, (1, length), device="cuda")
    for name, spec in (
        ("unpatched full cache", None),
        ("longlab snapkv:budget=2048,chunk=4096", "snapkv:budget=2048,chunk=4096"),
    ):
        longlab.reset(model)
        if spec:
            longlab.apply(model, spec)
        gc.collect()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()
        prefill_s = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() - before
        cache = out.past_key_values
        held = sum(
            t.nbytes
            for layer in cache.layers
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
            if t is not None
        )
        if spec:
            held = longlab.cache_stats(model).bytes_held
        token = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(new_tokens):
            step = model(token, past_key_values=cache, use_cache=True)
            token = step.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        rate = new_tokens / (time.perf_counter() - start)
        print(
            f"| {name} | {prefill_s:.2f} s | {peak / 2**30:.2f} GiB | {held / 2**20:.1f} MiB | {rate:.1f} |", flush=True
        )
        del out, cache, step
    longlab.reset(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="32k,128k")
    parser.add_argument("--parts", default="kernel,prefill,snapkv")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU")
    lengths = [_length(x) for x in args.lengths.split(",")]
    parts = args.parts.split(",")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, median of {args.repeats}")
    if "kernel" in parts:
        kernel(lengths, args.repeats)
    if "prefill" in parts or "snapkv" in parts:
        model = _llama3_8b()
        if "prefill" in parts:
            prefill(lengths, args.repeats, model)
        if "snapkv" in parts:
            snapkv(max(lengths), model, args.new_tokens)


if __name__ == "__main__":
    main()
