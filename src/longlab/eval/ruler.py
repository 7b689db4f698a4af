"""RULER's synthetic tasks (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?"), for those that need no downloaded data.

Each generator follows RULER's current scripts (``scripts/data/synthetic/*.py``, templates and
generation budgets from its ``constants.py``, scoring from ``scripts/eval``): newline-separated
noise and needle haystacks, the variable-tracking chain lines and the one in-context example RULER
prepends to ``vt`` and ``cwe``, cwe's one-line numbered list with its repeat counts, fwe's
Zipf-law counts of coded words. Where longlab deliberately differs (the prose haystack that stands
in for the Paul Graham essays, token-exact fitting) docs/evaluation.md lists it.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass

from longlab.data import synthetic
from longlab.data.haystack import filler
from longlab.data.synthetic import NOISE, SLOT, Sample, split_template, token_count
from longlab.eval.scoring import string_match_all


@dataclass(frozen=True)
class NeedleTask:
    """One RULER needle-in-a-haystack configuration."""

    haystack: str  # noise | prose | needle (a haystack made of distractor needles)
    key_kind: str  # words | uuids
    value_kind: str  # numbers | uuids | words
    keys: int = 1  # needles with different keys (1 queried, or `queries` queried)
    values: int = 1  # values under each key
    queries: int = 1  # keys asked together


NEEDLE_TASKS = {
    "niah_single_1": NeedleTask("noise", "words", "numbers"),
    "niah_single_2": NeedleTask("prose", "words", "numbers"),
    "niah_single_3": NeedleTask("prose", "words", "uuids"),
    "niah_multikey_1": NeedleTask("prose", "words", "numbers", keys=4),
    "niah_multikey_2": NeedleTask("needle", "words", "numbers"),
    "niah_multikey_3": NeedleTask("needle", "uuids", "uuids"),
    "niah_multivalue": NeedleTask("prose", "words", "numbers", values=4),
    "niah_multiquery": NeedleTask("prose", "words", "numbers", keys=4, queries=4),
}
OTHER_TASKS = ("vt", "cwe", "fwe")
TASKS = (*NEEDLE_TASKS, *OTHER_TASKS)

# RULER's constants.py: tokens_to_generate per task family (qa, which needs downloaded data, is 32)
TOKENS_TO_GENERATE = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}
# RULER's eval constants: string_match_all for niah, vt, cwe and fwe (string_match_part only for qa)
METRIC = {name: string_match_all for name in TASKS}

FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"

# RULER's needle depths: 40 evenly spaced percentages, drawn without replacement (prose haystack)
DEPTHS = tuple(round(i * 100 / 39) for i in range(40))
VT_EXAMPLE_TOKENS = 500  # RULER builds its vt in-context example at max_seq_length=500
CWE_LONG = 4096  # from this length cwe uses RULER's 30 / 3 repeats, below it 6 / 1
CWE_COMMON = 10
_CONTROL = re.compile(r"[\x00-\x1f]")

__all__ = ["METRIC", "TASKS", "TOKENS_TO_GENERATE", "postprocess", "sample", "score", "tokens_to_generate"]


def tokens_to_generate(name: str) -> int:
    """RULER's generation budget for task ``name``."""
    return TOKENS_TO_GENERATE["niah" if name in NEEDLE_TASKS else name]


def postprocess(prediction: str) -> str:
    """RULER's postprocess of a prediction: strip, control characters to newlines, strip again."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def score(name: str, prediction: str, references: list[str]) -> float:
    """RULER's score (0-100) of one prediction for task ``name``."""
    return METRIC[name](postprocess(prediction), references)


def _fit(
    tokenizer, build: Callable[[int], str], length: int, answer_tokens: int, name: str, least: int, most: int | None
) -> tuple[str, int]:
    """The largest n in [least, most] with build(n) plus ``answer_tokens`` within ``length`` tokens.

    A length that cannot hold ``build(least)`` -- the smallest prompt RULER would build -- raises a
    ValueError naming the length the task needs."""
    budget = length - answer_tokens
    smallest = token_count(tokenizer, build(least))
    if smallest > budget:
        raise ValueError(
            f"RULER {name} needs at least {smallest + answer_tokens} tokens here ({smallest} for its smallest "
            f"prompt and {answer_tokens} to generate); {length} is too short"
        )
    low, high = least, None  # build(low) fits; build(high) does not (None: not found yet)
    step = max(1, least)
    while high is None:
        probe = low + step if most is None else min(low + step, most)
        if probe == low:
            return build(low), low
        if token_count(tokenizer, build(probe)) <= budget:
            low, step = probe, step * 2
        else:
            high = probe
    while high - low > 1:
        middle = (low + high) // 2
        if token_count(tokenizer, build(middle)) <= budget:
            low = middle
        else:
            high = middle
    return build(low), low


# -- needle in a haystack ------------------------------------------------------------------------


def _random(rng: random.Random, kind: str) -> str:
    if kind == "words":  # keys: adjective-noun; values: a noun (RULER draws both from wonderwords)
        return synthetic.random_key(rng)
    return synthetic.random_value(rng, kind)


def needle_sample(name: str, tokenizer, length: int, rng: random.Random, folder: str | None = None,
                  answer_tokens: int = 128) -> Sample:  # fmt: skip
    task = NEEDLE_TASKS[name]
    keys: list[str] = []
    while len(keys) < task.keys:
        key = _random(rng, task.key_kind)
        if key not in keys:
            keys.append(key)
    values = [[synthetic.random_value(rng, task.value_kind) for _ in range(task.values)] for _ in keys]
    needles = [
        synthetic.NIAH_NEEDLE.format(type=task.value_kind, key=key, value=value)
        for key, key_values in zip(keys, values, strict=True)
        for value in key_values
    ]
    rng.shuffle(needles)
    asked = rng.sample(range(task.keys), task.queries)
    queried = [keys[i] for i in asked]
    answers = [value for i in asked for value in values[i]]
    query = queried[0] if len(queried) == 1 else ", ".join(queried[:-1]) + ", and " + queried[-1]
    singular = task.queries * task.values == 1  # RULER rewords the template for one asked value
    kind = synthetic.SINGULAR[task.value_kind] if singular else task.value_kind
    template = synthetic.NIAH_TEMPLATE_SINGULAR if singular else synthetic.NIAH_TEMPLATE
    prefix = synthetic.NIAH_ANSWER_PREFIX_SINGULAR if singular else synthetic.NIAH_ANSWER_PREFIX
    start, place_seed = rng.randrange(10**6), rng.getrandbits(64)
    depths = sorted(rng.sample(DEPTHS, len(needles)))
    distractor_rng, distractors = random.Random(rng.getrandbits(64)), []

    def haystack(n: int) -> list[str]:
        if task.haystack != "needle":
            return filler(task.haystack, n, start, folder)
        while len(distractors) < n:  # needles whose keys are never asked
            key = _random(distractor_rng, task.key_kind)
            if key not in keys:
                value = synthetic.random_value(distractor_rng, task.value_kind)
                distractors.append(synthetic.NIAH_NEEDLE.format(type=task.value_kind, key=key, value=value))
        return distractors[:n]

    def positions(n: int) -> list[int]:
        if task.haystack == "prose":  # RULER's essay haystack: needles at depths of the sentence list
            return [int(n * depth / 100) for depth in depths]
        return sorted(random.Random(place_seed).sample(range(n), len(needles)))  # noise/needle: RULER's draw

    def build(n: int) -> str:
        units, pieces, previous = haystack(n), [], 0
        for at, needle in zip(positions(n), needles, strict=True):
            pieces += [*units[previous:at], needle]
            previous = at
        pieces += units[previous:]
        context = (" " if task.haystack == "prose" else "\n").join(pieces)
        return template.format(type=kind, context=context, query=query) + prefix.format(type=kind, query=query)

    least = 1 if task.haystack == "prose" else len(needles)  # RULER draws distinct lines for the needles
    prompt, n = _fit(tokenizer, build, length, answer_tokens, name, least=least, most=None)
    depth = None
    if len(needles) == 1:
        depth = depths[0] / 100 if task.haystack == "prose" else positions(n)[0] / n
    filled = template.format(type=kind, context=SLOT, query=query) + prefix.format(type=kind, query=query)
    return Sample(prompt, answers, {"task": name, "length": length, "depth": depth}, split_template(prompt, filled))


# -- variable tracking ---------------------------------------------------------------------------


def _variables(rng: random.Random, count: int, letters: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    return names


def _chain(names: list[str], value: str) -> list[str]:
    """RULER's chain lines: "VAR A = value", then "VAR B = VAR A " (with its trailing space)."""
    return [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a} " for a, b in itertools.pairwise(names)]


def _vt_text(names: list[str], value: str, noises: int, place_seed: int) -> str:
    """The vt prompt, answer prefix included, with the chain among ``noises`` noise lines."""
    lines = [NOISE] * noises
    chain = _chain(names, value)
    for j, at in enumerate(sorted(random.Random(place_seed).sample(range(noises), len(chain)))):
        lines.insert(at + j, chain[j])
    context = "\n".join(lines)
    prompt = synthetic.VT_TEMPLATE.format(context=context, query=value)
    return prompt + synthetic.VT_ANSWER_PREFIX.format(count=len(names), query=value)


def vt_sample(tokenizer, length: int, rng: random.Random, answer_tokens: int = 30, hops: int = 4) -> Sample:
    """RULER vt: one chain of ``hops`` assignments among noise lines, after one solved example (3-letter
    names, filled to RULER's 500 tokens) of the same task."""
    example_names, example_value = _variables(rng, hops + 1, 3), str(rng.randint(10000, 99999))
    example_build = functools.partial(_vt_text, example_names, example_value, place_seed=rng.getrandbits(64))
    example_prompt, _ = _fit(tokenizer, example_build, VT_EXAMPLE_TOKENS, 0, "vt's example", hops + 1, None)
    example = f"{example_prompt} {' '.join(example_names)}\n"
    names, value = _variables(rng, hops + 1, 5), str(rng.randint(10000, 99999))
    place_seed = rng.getrandbits(64)

    def build(n: int) -> str:
        return example + "\n" + _vt_text(names, value, n, place_seed)

    prompt, _ = _fit(tokenizer, build, length, answer_tokens, "vt", least=hops + 1, most=None)
    filled = example + "\n" + synthetic.VT_TEMPLATE.format(context=SLOT, query=value)
    filled += synthetic.VT_ANSWER_PREFIX.format(count=len(names), query=value)
    return Sample(prompt, names, {"task": "vt", "length": length}, split_template(prompt, filled))


# -- common words --------------------------------------------------------------------------------


@functools.cache
def cwe_words() -> tuple[str, ...]:
    """RULER's cwe vocabulary: wonderwords' nouns, adjectives and verbs (single lowercase words)."""
    return tuple(sorted({w for kind in ("noun", "adjective", "verb") for w in synthetic.word_list(kind)}))


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


def _word_list(words: list[str], common: int, repeats: int, rare_repeats: int, order_seed: int) -> list[str]:
    listed = words[:common] * repeats + words[common:] * rare_repeats
    random.Random(order_seed).shuffle(listed)
    return listed


def _cwe_text(words: list[str], repeats: int, rare_repeats: int, order_seed: int) -> str:
    context = _numbered(_word_list(words, CWE_COMMON, repeats, rare_repeats, order_seed))
    return synthetic.CWE_TEMPLATE.format(context=context, count=CWE_COMMON) + synthetic.CWE_ANSWER_PREFIX.format(
        count=CWE_COMMON
    )


def cwe_sample(tokenizer, length: int, rng: random.Random, answer_tokens: int = 120) -> Sample:
    """RULER cwe: a numbered list where 10 words repeat (6 times, rare words once, below 4096 tokens;
    30 and 3 times from 4096), after one solved example (20 words 3 / 1, or 40 words 10 / 3)."""
    short = length < CWE_LONG
    example_words, example_repeats = (20, (3, 1)) if short else (40, (10, 3))
    repeats = (6, 1) if short else (30, 3)
    pool = cwe_words()
    chosen = rng.sample(pool, example_words)
    example = _cwe_text(chosen, *example_repeats, rng.getrandbits(64)) + " " + _numbered(chosen[:CWE_COMMON])
    words = rng.sample(pool, len(pool))
    order_seed = rng.getrandbits(64)

    def build(n: int) -> str:
        return example + "\n" + _cwe_text(words[:n], *repeats, order_seed)

    prompt, _ = _fit(tokenizer, build, length, answer_tokens, "cwe", least=CWE_COMMON, most=len(pool))
    filled = example + "\n" + synthetic.CWE_TEMPLATE.format(context=SLOT, count=CWE_COMMON)
    filled += synthetic.CWE_ANSWER_PREFIX.format(count=CWE_COMMON)
    return Sample(prompt, words[:CWE_COMMON], {"task": "cwe", "length": length}, split_template(prompt, filled))


# -- frequent words ------------------------------------------------------------------------------


def zeta(alpha: float) -> float:
    """Riemann zeta(alpha) for alpha > 1 (Euler-Maclaurin past 100 terms)."""
    n = 100
    head = sum(k**-alpha for k in range(1, n))
    return head + n ** (1 - alpha) / (alpha - 1) + n**-alpha / 2 + alpha * n ** (-alpha - 1) / 12


def fwe_counts(words: int, vocabulary: int, alpha: float = 2.0) -> list[int]:
    """RULER fwe's counts: rank k of the vocabulary appears int(words * k^-alpha / zeta(alpha)) times."""
    z = zeta(alpha)
    return [int(words * k**-alpha / z) for k in range(1, vocabulary + 1)]


def fwe_sample(tokenizer, length: int, rng: random.Random, answer_tokens: int = 50, alpha: float = 2.0) -> Sample:
    """RULER fwe: ``length // 50`` coded 6-letter words with Zipf-law counts, the most frequent replaced
    by '...' (noise); the answer is the next three."""
    size = length // 50
    if size < 4:
        raise ValueError(f"RULER fwe needs at least 200 tokens (a vocabulary of length // 50 >= 4 words); {length} "
                         "is too short")  # fmt: skip
    vocabulary: set[str] = set()
    while len(vocabulary) < size:
        vocabulary.add("".join(rng.choices(string.ascii_lowercase, k=6)))
    ranked = sorted(vocabulary)
    rng.shuffle(ranked)
    ranked[0] = "..."  # RULER treats the top-ranked word as noise
    order_seed = rng.getrandbits(64)
    # the fewest words for which ranks 2-4 (the answer) each appear, and more often than rank 5
    least = math.ceil(zeta(alpha) / (4**-alpha - (5**-alpha if size > 4 else 0)))

    def build(n: int) -> str:
        coded = [word for word, count in zip(ranked, fwe_counts(n, size, alpha), strict=True) for _ in range(count)]
        random.Random(order_seed).shuffle(coded)
        return FWE_TEMPLATE.format(context=" ".join(coded)) + FWE_ANSWER_PREFIX

    prompt, _ = _fit(tokenizer, build, length, answer_tokens, "fwe", least=least, most=None)
    parts = split_template(prompt, FWE_TEMPLATE.format(context=SLOT) + FWE_ANSWER_PREFIX)
    return Sample(prompt, ranked[1:4], {"task": "fwe", "length": length}, parts)


def sample(name: str, tokenizer, length: int, rng: random.Random, folder: str | None = None,
           answer_tokens: int | None = None) -> Sample:  # fmt: skip
    """One sample of RULER task ``name``; prompt plus ``answer_tokens`` (default: RULER's budget for the
    task) of generation fit ``length``."""
    budget = tokens_to_generate(name) if answer_tokens is None else answer_tokens
    if name in NEEDLE_TASKS:
        return needle_sample(name, tokenizer, length, rng, folder, budget)
    if name == "vt":
        return vt_sample(tokenizer, length, rng, budget)
    if name == "cwe":
        return cwe_sample(tokenizer, length, rng, budget)
    if name == "fwe":
        return fwe_sample(tokenizer, length, rng, budget)
    raise KeyError(name)
