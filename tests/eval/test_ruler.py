"""RULER task prompts against RULER's exact templates (docs/evaluation.md), wording rules and value types."""

from __future__ import annotations

import itertools
import random
import re

import pytest
from transformers import AutoTokenizer

import longlab
from longlab.data.synthetic import NOISE
from longlab.eval import ruler

TOKENIZER = AutoTokenizer.from_pretrained(longlab.model_path("tiny"))
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
WORD_KEY = r"[a-z]+-[a-z]+"
NEEDLE = re.compile(r"One of the special magic (numbers|uuids) for (\S+?) is: (\S+?)\.(?= |\n|$)")


def _sample(name, length=900, seed=0):
    return ruler.sample(name, TOKENIZER, length, random.Random(seed))


def _plural(kind, query):
    return (
        f"Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
        f"I will quiz you about the {kind} afterwards.\n",
        f"\nWhat are all the special magic {kind} for {query} mentioned in the provided text? "
        f"The special magic {kind} for {query} mentioned in the provided text are",
    )


def _singular(kind, query):
    return (
        f"A special magic {kind} is hidden within the following text. Make sure to memorize it. "
        f"I will quiz you about the {kind} afterwards.\n",
        f"\nWhat is the special magic {kind} for {query} mentioned in the provided text? "
        f"The special magic {kind} for {query} mentioned in the provided text is",
    )


@pytest.mark.parametrize(
    "name,key_pattern,value_pattern,haystack,needles",
    [
        ("niah_single_1", WORD_KEY, r"\d{7}", "noise", 1),
        ("niah_single_2", WORD_KEY, r"\d{7}", "prose", 1),
        ("niah_single_3", WORD_KEY, UUID, "prose", 1),
        ("niah_multikey_1", WORD_KEY, r"\d{7}", "prose", 4),
        ("niah_multikey_2", WORD_KEY, r"\d{7}", "needle", None),
        ("niah_multikey_3", UUID, UUID, "needle", None),
    ],
)
def test_single_answer_needles_use_singular_wording(name, key_pattern, value_pattern, haystack, needles):
    sample = _sample(name)
    (value,) = sample.answers
    found = NEEDLE.findall(sample.prompt)
    kind = "uuids" if value_pattern == UUID else "numbers"
    assert all(k == kind for k, _, _ in found)
    key = next(key for _, key, v in found if v == value)
    assert re.fullmatch(key_pattern, key) and re.fullmatch(value_pattern, value)
    head, tail = _singular(kind[:-1], key)
    assert sample.prompt.startswith(head) and sample.prompt.endswith(tail)
    if needles is not None:
        assert len(found) == needles
    else:  # a haystack made of distractor needles
        assert len(found) > 5 and NOISE not in sample.prompt
    assert (NOISE in sample.prompt) == (haystack == "noise")
    assert len({key for _, key, _ in found}) == len(found)  # distractor keys differ from the queried one


def test_multivalue_asks_four_values_of_one_key_in_plural():
    sample = _sample("niah_multivalue")
    found = NEEDLE.findall(sample.prompt)
    assert len(sample.answers) == 4 and len(found) == 4
    (key,) = {key for _, key, _ in found}
    head, tail = _plural("numbers", key)
    assert sample.prompt.startswith(head) and sample.prompt.endswith(tail)
    assert sorted(sample.answers) == sorted(v for _, _, v in found)


def test_multiquery_asks_four_keys_together():
    sample = _sample("niah_multiquery")
    found = NEEDLE.findall(sample.prompt)
    keys = [key for _, key, _ in found]
    assert len(found) == 4 and len(sample.answers) == 4
    query = re.search(r"What are all the special magic numbers for (.+?) mentioned", sample.prompt).group(1)
    assert re.fullmatch(rf"{WORD_KEY}, {WORD_KEY}, {WORD_KEY}, and {WORD_KEY}", query)
    assert sorted(query.replace(", and ", ", ").split(", ")) == sorted(keys)
    head, tail = _plural("numbers", query)
    assert sample.prompt.startswith(head) and sample.prompt.endswith(tail)


def test_variable_tracking_template_and_chain():
    sample = _sample("vt")
    value = re.search(r"VAR [A-Z]{5} = (\d{5})\.", sample.prompt).group(1)
    assert sample.prompt.startswith(
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    )
    assert sample.prompt.endswith(
        f"\nQuestion: Find all variables that are assigned the value {value} in the text above. "
        f"Answer: According to the chain(s) of variable assignment in the text above, 5 variables are "
        f"assgined the value {value}, they are: "
    )
    names = sample.answers
    assert len(names) == 5 and re.search(rf"VAR {names[0]} = {value}\.", sample.prompt)
    for a, b in itertools.pairwise(names):
        assert f"VAR {b} = VAR {a}." in sample.prompt


def test_common_words_list_and_answer():
    sample = _sample("cwe", length=2000)
    entries = re.findall(r"^(\d+)\. (\w+)$", sample.prompt, flags=re.M)
    assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
    counts = {}
    for _, word in entries:
        counts[word] = counts.get(word, 0) + 1
    top = sorted(counts, key=lambda w: -counts[w])[:10]
    assert sorted(top) == sorted(sample.answers)
    assert min(counts[w] for w in sample.answers) > max(c for w, c in counts.items() if w not in sample.answers)
    assert sample.prompt.endswith(
        "Question: What are the 10 most common words in the above list? "
        "Answer: The top 10 words that appear most often in the list are:"
    )


def test_frequent_words_follow_zipf_and_answer_the_top_three():
    sample = _sample("fwe", length=1500)
    words = re.findall(r"\b[a-z]{6}\b", sample.prompt.split("coded words. ", 1)[1].split("\nQuestion")[0])
    counts = {w: words.count(w) for w in set(words)}
    ranked = sorted(counts.values(), reverse=True)
    assert ranked[0] > 2 * ranked[2] > 0  # Zipf with alpha = 2 is steep
    assert {counts[w] for w in sample.answers} == set(ranked[:3]) or sorted(
        counts[w] for w in sample.answers
    ) == sorted(ranked[:3])
    assert sample.prompt.endswith(ruler.FWE_ANSWER_PREFIX)


@pytest.mark.parametrize("name", ruler.TASKS)
def test_every_task_fits_its_length_and_is_deterministic(name):
    first = _sample(name, length=1200, seed=5)
    assert first == _sample(name, length=1200, seed=5)
    assert len(TOKENIZER(first.prompt, add_special_tokens=False)["input_ids"]) <= 1200
