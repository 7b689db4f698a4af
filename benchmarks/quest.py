"""Quest vs SnapKV vs the full cache on the bundled model (trained at 512 tokens) at 4x and 8x length.

For each length, with a position method that reaches it, and each budget (tokens, equal for both):

- passkey accuracy (%) of ``full``, ``quest:budget=B`` and ``snapkv:budget=B`` (greedy, 8 new
  tokens, the bundled model's training format: 5-digit keys in filler sentences);
- bytes attention read in one decoding step (``longlab.cache_stats(...).bytes_read``, every layer)
  and bytes the cache holds, each as a ratio to ``full``;
- decode-step time (prefill of random tokens, then ``--steps`` single-token steps) as a ratio to
  ``full``: the process's CPU time (one thread), which a machine shared with other jobs does not
  inflate the way it inflates wall-clock time.

    python benchmarks/quest.py --threads 1                # 2048 and 4096, budgets 256 and 512, 10 samples
    python benchmarks/quest.py --lengths 2048 --samples 4 --budgets 512
    python benchmarks/quest.py --threads 1 --time-only      # decode-step time only
"""

from __future__ import annotations

import argparse
import random
import time

import torch

import longlab
from longlab.data.synthetic import passkey
from longlab.eval.scoring import first_integer_matches
from longlab.generation import encode

POSITIONS = {2048: "selfextend:group=8,window=128", 4096: "dca"}


def accuracy(model, tokenizer, spec: str, length: int, samples: int) -> tuple[float, int, int]:
    """Passkey accuracy (%) and the bytes read by the last decoding step and held, for one spec."""
    longlab.apply(model, spec)
    correct = 0
    for seed in range(samples):
        sample = passkey(tokenizer, length, random.Random(seed), digits=5, garbage="sentences")
        ids = encode(tokenizer, sample.prompt)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        correct += first_integer_matches(tokenizer.decode(out[0, ids.shape[1] :]), sample.answers[0])
    stats = longlab.cache_stats(model)
    return 100 * correct / samples, stats.bytes_read, stats.bytes_held


def step_time(model, spec: str, length: int, steps: int) -> float:
    """CPU seconds per decoding step after a prefill of ``length`` random tokens."""
    longlab.apply(model, spec)
    ids = torch.randint(10, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, use_cache=True, logits_to_keep=1)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        out = model(token, past_key_values=cache, use_cache=True)  # warm-up step
        token = out.logits[:, -1:].argmax(-1)
        start = time.process_time()
        for _ in range(steps):
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
    return (time.process_time() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="2048,4096")
    parser.add_argument("--budgets", default="256,512")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--time-only", action="store_true", help="decode-step time only (no passkey, no bytes)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = longlab.load("tiny")
    if args.time_only:
        print("| L | position | cache | decode CPU ms/step (× full) |")
        print("|---|---|---|---|")
    else:
        print(
            "| L | position | cache | passkey % | bytes read / step (× full) | bytes held (× full) "
            "| decode CPU ms/step (× full) |"
        )
        print("|---|---|---|---|---|---|---|")
    for length in (int(x) for x in args.lengths.split(",")):
        position = POSITIONS.get(length, "dca")
        caches = ["full"]
        for budget in (int(x) for x in args.budgets.split(",")):
            caches += [f"quest:budget={budget}", f"snapkv:budget={budget}"]
        full_time = None
        for cache in caches:
            seconds = step_time(model, f"{position}+{cache}", length, args.steps)
            full_time = full_time or seconds
            timing = f"{1000 * seconds:.1f} ({seconds / full_time:.2f}×)"
            if args.time_only:
                print(f"| {length} | `{position}` | `{cache}` | {timing} |", flush=True)
                continue
            acc, read, held = accuracy(model, tokenizer, f"{position}+{cache}", length, args.samples)
            if cache == "full":
                full_read, full_held = read, held
            print(
                f"| {length} | `{position}` | `{cache}` | {acc:.0f} | {read / 2**20:.2f} MiB ({read / full_read:.3f}×) "
                f"| {held / 2**20:.2f} MiB ({held / full_held:.3f}×) | {timing} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
