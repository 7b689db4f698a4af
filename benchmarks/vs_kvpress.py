"""longlab's cache policies side by side with NVIDIA's kvpress presses, same model, same prompts.

kvpress is an optional, benchmark-only dependency that needs transformers < 5.3; run this in an
environment of its own (longlab itself works there too):

    python -m venv /tmp/kvenv
    /tmp/kvenv/bin/pip install "torch==2.13.0" "transformers>=5.2,<5.3" "kvpress==0.5.5"
    /tmp/kvenv/bin/pip install -e .
    /tmp/kvenv/bin/python benchmarks/vs_kvpress.py

For each method (SnapKV, StreamingLLM, TOVA, K-norm) and compression ratio, in a fresh process per
implementation (so peak memory is its own): passkey prompts at the bundled model's training length
(plain RoPE for both, so neither needs an extension method), prefill, then greedy decoding. kvpress
compresses the prompt inside ``with press(model)`` and lets the cache grow while decoding, as its
pipeline does; longlab holds its ratio while decoding too. Printed per row: passkey accuracy, cache
bytes after prefill and after decoding ``--new-tokens`` tokens (longlab's include each entry's
position), and peak extra memory during prefill. ``longlab chunked`` rows prefill in
chunks of ``--chunk`` tokens.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time

METHODS = ["snapkv", "streaming", "tova", "knorm"]
IMPLEMENTATIONS = ["kvpress", "longlab", "longlab chunked"]


def _press(method: str, ratio: float):
    import kvpress

    presses = {
        "snapkv": lambda: kvpress.SnapKVPress(compression_ratio=ratio, window_size=64, kernel_size=5),
        "streaming": lambda: kvpress.StreamingLLMPress(compression_ratio=ratio, n_sink=4),
        "tova": lambda: kvpress.TOVAPress(compression_ratio=ratio),
        "knorm": lambda: kvpress.KnormPress(compression_ratio=ratio),
    }
    return presses[method]()


def _spec(method: str, ratio: float, prompt_tokens: int, chunk: int | None) -> str:
    chunked = f",chunk={chunk}" if chunk else ""
    if method == "streaming":  # a fixed window: the one that keeps kvpress's int(n * (1 - ratio)) tokens
        return f"streaming:sinks=4,window={int(prompt_tokens * (1 - ratio)) - 4}{chunked}"
    if method == "snapkv":
        return f"snapkv:ratio={ratio},window=64,kernel=5{chunked}"
    return f"{method}:ratio={ratio}{chunked}"


def _cache_bytes(implementation: str, model, cache) -> int:
    if implementation == "kvpress":
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    import longlab

    return longlab.cache_stats(model).bytes_held


def _measure(implementation: str, method: str, ratio: float, args) -> dict:
    import contextlib

    import torch
    from transformers import DynamicCache

    import longlab
    from longlab.data.synthetic import passkey
    from longlab.eval import memory
    from longlab.generation import encode

    torch.set_num_threads(args.threads)
    model, tokenizer = longlab.load("tiny")
    samples = [passkey(tokenizer, args.length, random.Random(i)) for i in range(args.samples)]
    correct, prefill_bytes, final_bytes, peaks, seconds = 0, [], [], [], 0.0
    for sample in samples:
        ids = encode(tokenizer, sample.prompt)
        if implementation == "kvpress":
            context = _press(method, ratio)(model)
        else:
            chunk = args.chunk if implementation == "longlab chunked" else None
            longlab.apply(model, _spec(method, ratio, ids.shape[1], chunk))
            context = contextlib.nullcontext()
        cache = DynamicCache()
        memory.reset_peak()
        baseline = memory.resident_bytes()
        start = time.perf_counter()
        with torch.no_grad():
            with context:
                out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            peaks.append(memory.peak_bytes() - baseline)
            prefill_bytes.append(_cache_bytes(implementation, model, cache))
            tokens = [out.logits[:, -1:].argmax(-1)]
            for step in range(args.new_tokens - 1):
                # explicit positions: after kvpress's eviction the cache length is no longer the position
                position = torch.tensor([ids.shape[1] + step])
                out = model(tokens[-1], past_key_values=cache, use_cache=True, position_ids=position[None],
                            cache_position=position)  # fmt: skip
                tokens.append(out.logits[:, -1:].argmax(-1))
        seconds += time.perf_counter() - start
        final_bytes.append(_cache_bytes(implementation, model, cache))
        answer = tokenizer.decode(torch.cat(tokens, dim=1)[0])
        correct += sample.answers[0] in answer
    return {
        "implementation": implementation,
        "method": method,
        "ratio": ratio,
        "accuracy": 100 * correct / len(samples),
        "prefill_bytes": sum(prefill_bytes) / len(samples),
        "final_bytes": sum(final_bytes) / len(samples),
        "peak_extra": max(peaks),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", default="0.5,0.75")
    parser.add_argument("--length", type=int, default=512, help="prompt tokens (the bundled model's L_train)")
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the measurements to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        implementation, method, ratio = args.child.split("@")
        print(json.dumps(_measure(implementation, method, float(ratio), args)))
        return

    from importlib.metadata import version

    print(
        f"bundled tiny model, fp32, passkey at {args.length} tokens, {args.samples} samples, "
        f"{args.new_tokens} new tokens, kvpress {version('kvpress')}, transformers {version('transformers')}\n"
    )
    print("| method | ratio | implementation | passkey % | cache KiB after prefill | after decoding | peak extra MiB |")
    print("|---|---|---|---|---|---|---|")
    results = []
    for ratio in [float(x) for x in args.ratios.split(",")]:
        for method in METHODS:
            for implementation in IMPLEMENTATIONS:
                child = f"{implementation}@{method}@{ratio}"
                command = [sys.executable, __file__, "--child", child]
                for name in ("length", "samples", "new_tokens", "chunk", "threads"):
                    command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                r = json.loads(done.stdout.strip().splitlines()[-1])
                results.append(r)
                print(
                    f"| {method} | {ratio} | {implementation} | {r['accuracy']:.0f} | {r['prefill_bytes'] / 1024:.0f} "
                    f"| {r['final_bytes'] / 1024:.0f} | {r['peak_extra'] / 2**20:.1f} |",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
