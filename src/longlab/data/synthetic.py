"""Generators of synthetic long-context samples, shared by training and evaluation.

Formats follow docs/evaluation.md exactly (the passkey format of Landmark Attention, Mohtashami & Jaggi,
2023; RULER's needle templates, Hsieh et al., 2024); the variable-tracking and word-counting exercises
are the bundled model's training formats (RULER's own vt, cwe and fwe are in ``longlab.eval.ruler``).
Every generator takes the model's tokenizer and a length in *tokens*, template and generation budget
included, and a ``random.Random`` so the same seed gives the same prompt on any machine with the same
tokenizer.
"""

from __future__ import annotations

import functools
import itertools
import random
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources

PASSKEY_TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"

NIAH_NEEDLE = "One of the special magic {type} for {key} is: {value}."
NIAH_TEMPLATE = (
    "Some special magic {type} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type} afterwards.\n{context}\n"
    "What are all the special magic {type} for {query} mentioned in the provided text?"
)
NIAH_ANSWER_PREFIX = " The special magic {type} for {query} mentioned in the provided text are"
NIAH_TEMPLATE_SINGULAR = (
    "A special magic {type} is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type} afterwards.\n{context}\n"
    "What is the special magic {type} for {query} mentioned in the provided text?"
)
NIAH_ANSWER_PREFIX_SINGULAR = " The special magic {type} for {query} mentioned in the provided text is"
SINGULAR = {"numbers": "number", "uuids": "uuid", "words": "word"}

VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {count} variables are "
    "assgined the value {query}, they are: "
)  # "assgined" is RULER's spelling, kept so scores compare across tools

CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\n"
    "Question: What are the {count} most common words in the above list?"
)
CWE_ANSWER_PREFIX = " Answer: The top {count} words that appear most often in the list are:"


@dataclass
class Sample:
    """One prompt, the strings a correct answer contains, and what describes it. ``parts`` is the
    prompt split as (instruction, context, question) -- their concatenation is exactly ``prompt`` --
    for context methods, which change the context and keep the rest; None where a task cannot split."""

    prompt: str
    answers: list[str]
    meta: dict = field(default_factory=dict)
    parts: tuple[str, str, str] | None = None

    def __post_init__(self) -> None:
        if self.parts is not None and "".join(self.parts) != self.prompt:
            raise ValueError("a sample's parts (instruction, context, question) must join to its prompt")


SLOT = "\x00CONTEXT\x00"  # stands in for the context when a template is split around it


def split_prompt(prompt: str, head: str, tail: str) -> tuple[str, str, str] | None:
    """(head, middle, tail) when ``prompt`` starts with ``head`` and ends with ``tail`` (the texts a
    template puts before and after its context), else None: the prompt cannot be split."""
    if len(head) + len(tail) > len(prompt) or not prompt.startswith(head) or not prompt.endswith(tail):
        return None
    return head, prompt[len(head) : len(prompt) - len(tail)], tail


def split_template(prompt: str, filled: str) -> tuple[str, str, str] | None:
    """Split ``prompt`` around its context, given the same template ``filled`` with :data:`SLOT` as
    the context: the text before the slot is the instruction, the text after it the question."""
    head, _, tail = filled.partition(SLOT)
    return split_prompt(prompt, head, tail)


@functools.cache
def word_list(kind: str) -> tuple[str, ...]:
    """wonderwords' bundled lists ('noun', 'adjective', 'verb'), single lowercase words only."""
    text = resources.files("wonderwords.assets").joinpath(f"{kind}list.txt").read_text()
    return tuple(sorted({w for w in text.split() if w.isalpha() and w.islower()}))


def random_key(rng: random.Random) -> str:
    """A RULER-style key: adjective-noun."""
    return f"{rng.choice(word_list('adjective'))}-{rng.choice(word_list('noun'))}"


def random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if kind == "words":
        return rng.choice(word_list("noun"))
    raise ValueError(f"value kind must be numbers, uuids or words, got {kind!r}")


def token_count(tokenizer, text: str) -> int:
    """Tokens of ``text`` as prompts are encoded (no special tokens)."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def fit(tokenizer, build: Callable[[int], str], budget: int) -> tuple[str, int]:
    """The text ``build(n)`` with the largest number n of filler units whose token count is <= budget.

    Token counts grow with n (not always evenly: prose sentences differ in length), so a linear
    estimate brackets n and a bisection settles it in a few tokenizations.
    """
    base, one = token_count(tokenizer, build(0)), token_count(tokenizer, build(1))
    if base > budget:
        raise ValueError(f"a length of {budget} tokens cannot hold even the template ({base} tokens)")
    if one > budget:
        return build(0), 0
    low, high = 1, max(2, 2 * (budget - base) // max(one - base, 1) + 2)
    while token_count(tokenizer, build(high)) <= budget:  # make sure `high` is past the budget
        low, high = high, high * 2
    while high - low > 1:  # invariant: build(low) fits, build(high) does not
        middle = (low + high) // 2
        if token_count(tokenizer, build(middle)) <= budget:
            low = middle
        else:
            high = middle
    return build(low), low


def _depth(rng: random.Random, depth: float | None) -> float:
    return rng.random() if depth is None else depth


def landmark_garbage(chars: int) -> str:
    """The first ``chars`` characters of the filler sentence group repeated with spaces (Landmark's
    ``" ".join([garbage] * 2000)[:n]``: the cut may fall inside a word)."""
    repeats = chars // (len(NOISE) + 1) + 1
    return " ".join([NOISE] * repeats)[:chars]


def passkey(
    tokenizer,
    length: int,
    rng: random.Random,
    digits: int | None = None,
    depth: float | None = None,
    answer_tokens: int = 8,
    garbage: str = "characters",
) -> Sample:
    """Landmark-format passkey retrieval: the key hidden at ``depth`` (0 = start, 1 = end) of filler.

    The key is Landmark's ``randint(1, 50000)`` by default, or an integer of exactly ``digits`` digits.
    ``garbage="characters"`` cuts the filler by characters as Landmark's script does; ``"sentences"``
    uses whole filler sentence groups (the format the bundled model was trained on, kept for
    ``longlab train``)."""
    low, high = (1, 50000) if digits is None else (10 ** (digits - 1), 10**digits - 1)
    key = str(rng.randint(low, high))
    depth = _depth(rng, depth)
    if garbage == "characters":
        unit = landmark_garbage
    elif garbage == "sentences":
        unit = lambda n: " ".join([NOISE] * n)  # noqa: E731
    else:
        raise ValueError(f"garbage must be 'characters' or 'sentences', got {garbage!r}")

    def build(n: int) -> str:
        before = round(n * depth)
        needle = PASSKEY_NEEDLE.format(key=key)
        return "\n".join([PASSKEY_TASK, unit(before), needle, unit(n - before), PASSKEY_QUESTION])

    prompt, _ = fit(tokenizer, build, length - answer_tokens)
    parts = split_prompt(prompt, PASSKEY_TASK + "\n", "\n" + PASSKEY_QUESTION)
    return Sample(prompt, [key], {"task": "passkey", "length": length, "depth": depth}, parts)


def niah_single(
    tokenizer,
    length: int,
    rng: random.Random,
    value_kind: str = "numbers",
    depth: float | None = None,
    answer_tokens: int = 24,
) -> Sample:
    """RULER niah_single_1: one key-value needle in the noise haystack, singular wording."""
    key, value = random_key(rng), random_value(rng, value_kind)
    kind = SINGULAR[value_kind]
    depth = _depth(rng, depth)
    needle = NIAH_NEEDLE.format(type=value_kind, key=key, value=value)

    def build(n: int) -> str:
        before = round(n * depth)
        context = " ".join([NOISE] * before + [needle] + [NOISE] * (n - before))
        prompt = NIAH_TEMPLATE_SINGULAR.format(type=kind, context=context, query=key)
        return prompt + NIAH_ANSWER_PREFIX_SINGULAR.format(type=kind, query=key)

    prompt, _ = fit(tokenizer, build, length - answer_tokens)
    filled = NIAH_TEMPLATE_SINGULAR.format(type=kind, context=SLOT, query=key)
    parts = split_template(prompt, filled + NIAH_ANSWER_PREFIX_SINGULAR.format(type=kind, query=key))
    return Sample(prompt, [value], {"task": "niah_single", "length": length, "depth": depth}, parts)


def key_value_lookup(tokenizer, length: int, rng: random.Random, queries: int = 4, answer_tokens: int = 12) -> Sample:
    """Dense key-value retrieval for training: a haystack made of RULER needles (as niah_multikey_2),
    then ``queries`` of its keys asked one after another in RULER's singular wording, each answered
    but the last (the sample's answer). Many retrieval targets per context."""
    queries = max(1, min(queries, (length - 60) // 70))  # each question with its answer takes ~65 tokens
    pairs: dict[str, str] = {}
    while len(pairs) < max(queries, length // 10):  # more needles than fit: each takes over 10 tokens
        pairs.setdefault(random_key(rng), random_value(rng, "numbers"))
    keys = list(pairs)
    fractions = [rng.random() for _ in range(queries)]  # where in the haystack the asked keys sit

    def question(key: str) -> str:
        return (f"What is the special magic number for {key} mentioned in the provided text?"
                + NIAH_ANSWER_PREFIX_SINGULAR.format(type="number", query=key))  # fmt: skip

    def asked(n: int) -> list[str]:
        return [keys[min(int(f * n), n - 1)] for f in fractions]

    def build(n: int) -> str:
        n = min(max(n, 1), len(keys))
        context = " ".join(NIAH_NEEDLE.format(type="numbers", key=k, value=pairs[k]) for k in keys[:n])
        *answered, last = asked(n)
        return "\n".join([context, *(f"{question(k)} {pairs[k]}." for k in answered), question(last)])

    prompt, n = fit(tokenizer, build, length - answer_tokens)
    return Sample(prompt, [pairs[asked(min(max(n, 1), len(keys)))[-1]]], {"task": "kv_lookup", "length": length})


def repeated_numbers(tokenizer, length: int, rng: random.Random, answer_tokens: int = 8) -> Sample:
    """Dense copying for training: a list of random 5-digit numbers, then the same list again. Every
    number of the second copy is a copy target -- the skill passkey retrieval rests on (an
    induction head, Olsson et al., 2022)."""
    numbers = [str(rng.randint(10**4, 10**5 - 1)) for _ in range(length // 6)]

    def build(n: int) -> str:
        shown = numbers[: max(n, 1)]
        return f"Numbers: {' '.join(shown)}\nThe same numbers again: {' '.join(shown[:-1])}".rstrip()

    prompt, n = fit(tokenizer, build, length - answer_tokens)
    return Sample(prompt, [numbers[max(n, 1) - 1]], {"task": "repeat", "length": length})


def _variable(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


def variable_tracking(tokenizer, length: int, rng: random.Random, hops: int = 4, answer_tokens: int = 40) -> Sample:
    """A variable-tracking training exercise in the style of RULER vt: one chain VAR A = value, VAR B =
    VAR A, ... spread through the noise haystack (the bundled model's format; the evaluation's exact
    RULER vt is ``longlab.eval.ruler``)."""
    value = str(rng.randint(10**4, 10**5 - 1))
    names = [_variable(rng) for _ in range(hops + 1)]
    lines = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in itertools.pairwise(names)]
    cuts = sorted(rng.random() for _ in lines)

    def build(n: int) -> str:
        pieces, previous = [], 0
        for cut, line in zip(cuts, lines, strict=True):
            at = round(n * cut)
            pieces += [NOISE] * (at - previous) + [line]
            previous = at
        context = " ".join(pieces + [NOISE] * (n - previous))
        prompt = VT_TEMPLATE.format(context=context, query=value)
        return prompt + VT_ANSWER_PREFIX.format(count=len(names), query=value)

    prompt, _ = fit(tokenizer, build, length - answer_tokens)
    return Sample(prompt, names, {"task": "vt", "length": length})


def common_words(
    tokenizer, length: int, rng: random.Random, top: int = 3, repeats: int = 6, answer_tokens: int = 24
) -> Sample:
    """A word-counting training exercise in the style of RULER cwe: a numbered word list, one word a
    line, where ``top`` words appear ``repeats`` times (the bundled model's format; the evaluation's
    exact RULER cwe is ``longlab.eval.ruler``)."""
    vocabulary = list(word_list("noun"))
    rng.shuffle(vocabulary)
    common, rare_pool = vocabulary[:top], vocabulary[top:]
    order_seed = rng.getrandbits(32)

    def build(n: int) -> str:
        words = [w for w in common for _ in range(repeats)] + rare_pool[:n]
        order = random.Random(order_seed + n).sample(words, len(words))
        listing = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(order))
        return CWE_TEMPLATE.format(context=listing, count=top) + CWE_ANSWER_PREFIX.format(count=top)

    prompt, _ = fit(tokenizer, build, length - answer_tokens)
    return Sample(prompt, common, {"task": "cwe", "length": length})
