"""Context methods on the bundled model: pcw, nbce and dca+retrieval_attention against dca alone.

The bundled model was trained at 512 tokens; each length (default 2048, 4096, 8192: 4x, 8x, 16x) gets
the same Landmark-format passkey samples (docs/evaluation.md), and each method, in a fresh process
(so peak memory is its own), answers them greedily. Reported per method and length, each with its
ratio to ``dca`` at the same length:

- passkey accuracy (first integer of the answer equals the key), %;
- latency per sample (prompt to answer), s;
- peak extra resident memory over the model and the prompt (VmHWM on the CPU, the allocator's peak on CUDA);
- KV cache bytes held after the answer (``longlab.cache_stats``: for retrieval_attention the sinks and
  window on the device; its far store is reported in the last column);
- for the decoding rows (dca, retrieval): mean time of one decoding step after the prompt.

    python benchmarks/context_methods.py --samples 2
    python benchmarks/context_methods.py --lengths 2048 --samples 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

METHODS = {  # row name -> (what longlab.apply gets, the context method or None)
    "dca": ("dca", None),
    "pcw": ("none", "pcw"),
    "nbce": ("none", "nbce"),
    "dca+retrieval_attention": ("dca+retrieval_attention:sinks=4,window=256,top_k=64", None),
}


def _query(prompt: str):
    from longlab.context.base import ContextQuery
    from longlab.data import synthetic

    head, tail = synthetic.PASSKEY_TASK + "\n", "\n" + synthetic.PASSKEY_QUESTION
    assert prompt.startswith(head) and prompt.endswith(tail)
    return ContextQuery(head, prompt[len(head) : -len(tail)], tail)


def _decode(model, tokenizer, ids, new_tokens: int) -> tuple[str, list[float], int]:
    """Greedy answer of a plain (cache-method) row, timing each decoding step; with the bytes of
    retrieval_attention's far stores (host memory on the CPU), 0 for other caches."""
    import torch

    from longlab.context import rows as chunks

    steps = []
    with torch.no_grad():
        out = model(ids, use_cache=True, logits_to_keep=1)
        cache, token, tokens = out.past_key_values, out.logits[:, -1:].argmax(-1), []
        for _ in range(new_tokens):
            tokens.append(int(token))
            if chunks.done(tokenizer, tokens, True):
                break
            start = time.perf_counter()
            out = chunks.forward(model, cache, input_ids=token)
            steps.append(time.perf_counter() - start)
            token = out.logits[:, -1:].argmax(-1)
    far = sum(getattr(layer.entries, "far_nbytes", 0) for layer in cache.layers)
    return chunks.finish(tokenizer, tokens, True), steps, far


def _measure(name: str, length: int, samples: int, new_tokens: int, threads: int) -> dict:
    import random

    import torch

    import longlab
    from longlab.data import synthetic
    from longlab.eval import memory
    from longlab.eval.scoring import first_integer_matches
    from longlab.spec import build

    torch.set_num_threads(threads)
    model, tokenizer = longlab.load("tiny")
    spec, context = METHODS[name]
    longlab.apply(model, spec)
    rng = random.Random(0)
    grid = [(i + 0.5) / samples for i in range(samples)]
    tasks = [synthetic.passkey(tokenizer, length, rng, depth=d, answer_tokens=new_tokens) for d in grid]
    memory.reset_peak()
    baseline = memory.resident_bytes()
    correct, latency, steps, held, far = 0, [], [], 0, 0
    for sample in tasks:
        start = time.perf_counter()
        if context is None:
            ids = tokenizer(sample.prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
            answer, step, far = _decode(model, tokenizer, ids, new_tokens)
            steps += step
        else:
            answer = build(context, {}).answer(model, tokenizer, [_query(sample.prompt)], new_tokens, True)[0]
        latency.append(time.perf_counter() - start)
        correct += first_integer_matches(answer, sample.answers[0])
        held = longlab.cache_stats(model).bytes_held
    return {
        "method": name,
        "length": length,
        "accuracy": 100 * correct / len(tasks),
        "latency_s": sum(latency) / len(latency),
        "peak_extra": memory.peak_bytes() - baseline,
        "bytes_held": held,
        "far_bytes": far,
        "step_s": sum(steps) / len(steps) if steps else None,
    }


def _ratio(value, base) -> str:
    return f"{value / base:.2f}×" if value is not None and base else "—"


def _row(r: dict, base: dict) -> str:
    mib = 2**20
    step = f"{1000 * r['step_s']:.1f} ({_ratio(r['step_s'], base['step_s'])})" if r["step_s"] else "—"
    far = f"{r['far_bytes'] / mib:.2f}" if r["far_bytes"] else "—"
    return (
        f"| {r['length']} | `{r['method']}` | {r['accuracy']:.0f} (dca {base['accuracy']:.0f}) "
        f"| {r['latency_s']:.2f} ({_ratio(r['latency_s'], base['latency_s'])}) "
        f"| {r['peak_extra'] / mib:.0f} ({_ratio(r['peak_extra'], base['peak_extra'])}) "
        f"| {r['bytes_held'] / mib:.2f} ({_ratio(r['bytes_held'], base['bytes_held'])}) | {step} | {far} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="2048,4096,8192")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the measurements to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, length = args.child.rsplit("@", 1)
        print(json.dumps(_measure(name, int(length), args.samples, args.new_tokens, args.threads)))
        return
    print(
        f"bundled tiny model (trained at 512), fp32, CPU, {args.threads} thread(s), {args.samples} passkey "
        f"samples per length, {args.new_tokens} new tokens; ratios are to `dca` at the same length\n"
    )
    print("| L | method | passkey % | s / sample | peak extra MiB | cache MiB held | ms / decode step | far MiB |")
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for length in [int(x) for x in args.lengths.split(",")]:
        base = None
        for name in ["dca", *(m for m in args.methods.split(",") if m != "dca")]:
            command = [sys.executable, __file__, "--child", f"{name}@{length}", "--samples", str(args.samples)]
            command += ["--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            base = base or r
            results.append(r)
            print(_row(r, base), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
