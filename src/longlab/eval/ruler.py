"""RULER's synthetic tasks (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?"), for those that need no downloaded data.

Templates, answer prefixes, value types and metrics follow RULER (docs/evaluation.md); keys and words come
from wonderwords' lists. The prose haystack stands in for RULER's Paul Graham essays.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

import numpy as np

from longlab.data import synthetic
from longlab.data.haystack import filler
from longlab.data.synthetic import Sample, fit


@dataclass(frozen=True)
class NeedleTask:
    """One RULER needle-in-a-haystack configuration."""

    haystack: str  # noise | prose | needle (a haystack made of distractor needles)
    key_kind: str  # words | uuids
    value_kind: str  # numbers | uuids | words
    keys: int = 1  # needles with different keys (1 queried, or `queries` queried)
    values: int = 1  # values under the queried key
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
# RULER scores the multi-query and multi-value needles by all references; so too vt, cwe and fwe
METRIC = {name: "string_match_all" for name in TASKS}

FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"


def _key(rng: random.Random, kind: str) -> str:
    return synthetic.random_key(rng) if kind == "words" else synthetic.random_value(rng, "uuids")


def _query_text(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def needle_sample(
    name: str, tokenizer, length: int, rng: random.Random, folder: str | None = None, answer_tokens: int = 64
) -> Sample:
    task = NEEDLE_TASKS[name]
    keys: list[str] = []
    while len(keys) < task.keys:
        key = _key(rng, task.key_kind)
        if key not in keys:
            keys.append(key)
    values = {key: [synthetic.random_value(rng, task.value_kind) for _ in range(task.values)] for key in keys}
    needles = [
        synthetic.NIAH_NEEDLE.format(type=task.value_kind, key=key, value=value)
        for key in keys
        for value in values[key]
    ]
    rng.shuffle(needles)
    depths = sorted(rng.random() for _ in needles)
    queried = keys[: task.queries]
    answers = [value for key in queried for value in values[key]]
    start = rng.randrange(10**6)
    plural = len(answers) > 1
    kind = task.value_kind if plural else synthetic.SINGULAR[task.value_kind]
    template = synthetic.NIAH_TEMPLATE if plural else synthetic.NIAH_TEMPLATE_SINGULAR
    prefix = synthetic.NIAH_ANSWER_PREFIX if plural else synthetic.NIAH_ANSWER_PREFIX_SINGULAR
    query = _query_text(queried)
    distractor_rng = random.Random(rng.getrandbits(64))
    distractors: list[str] = []

    def units(n: int) -> list[str]:
        if task.haystack != "needle":
            return filler(task.haystack, n, start, folder)
        while len(distractors) < n:  # a haystack of needles whose keys are never asked
            key = _key(distractor_rng, task.key_kind)
            if key not in keys:
                value = synthetic.random_value(distractor_rng, task.value_kind)
                distractors.append(synthetic.NIAH_NEEDLE.format(type=task.value_kind, key=key, value=value))
        return distractors[:n]

    def build(n: int) -> str:
        hay, pieces, previous = units(n), [], 0
        for depth, needle in zip(depths, needles, strict=True):
            at = round(n * depth)
            pieces += [*hay[previous:at], needle]
            previous = at
        context = " ".join(pieces + hay[previous:])
        return template.format(type=kind, context=context, query=query) + prefix.format(type=kind, query=query)

    prompt, _ = fit(tokenizer, build, length - answer_tokens)
    meta = {"task": name, "length": length, "depth": depths[0] if len(depths) == 1 else None}
    return Sample(prompt, answers, meta)


def fwe_sample(tokenizer, length: int, rng: random.Random, alpha: float = 2.0, answer_tokens: int = 32) -> Sample:
    """RULER fwe: coded words drawn from a Zipf(alpha) distribution; the answer is the top three."""
    vocabulary = ["".join(rng.choice(string.ascii_lowercase) for _ in range(6)) for _ in range(800)]
    draw_seed = rng.getrandbits(32)

    def words(n: int) -> list[str]:
        ranks = np.random.default_rng(draw_seed).zipf(alpha, size=n)
        return [vocabulary[min(r, len(vocabulary)) - 1] for r in ranks]

    def build(n: int) -> str:
        return FWE_TEMPLATE.format(context=" .... ".join(words(n))) + FWE_ANSWER_PREFIX

    prompt, n = fit(tokenizer, build, length - answer_tokens)
    counts: dict[str, int] = {}
    for word in words(n):
        counts[word] = counts.get(word, 0) + 1
    top = sorted(counts, key=lambda w: (-counts[w], w))[:3]
    if len(top) < 3 or counts[top[2]] < 2:
        raise ValueError(f"a length of {length} tokens is too short for fwe: no three words repeat")
    return Sample(prompt, top, {"task": "fwe", "length": length})


def sample(
    name: str, tokenizer, length: int, rng: random.Random, folder: str | None = None, answer_tokens: int = 64
) -> Sample:
    """One sample of RULER task ``name``; prompt plus ``answer_tokens`` of generation fit ``length``."""
    if name in NEEDLE_TASKS:
        return needle_sample(name, tokenizer, length, rng, folder, answer_tokens)
    if name == "vt":
        return synthetic.variable_tracking(tokenizer, length, rng, answer_tokens=answer_tokens)
    if name == "cwe":
        # RULER repeats each of the 10 common words 30 times at 4k+; shorter inputs scale that down so
        # the common words fill at most about a third of the list
        repeats = max(2, min(30, length // 120))
        return synthetic.common_words(tokenizer, length, rng, top=10, repeats=repeats, answer_tokens=answer_tokens)
    if name == "fwe":
        return fwe_sample(tokenizer, length, rng, answer_tokens=answer_tokens)
    raise KeyError(name)
