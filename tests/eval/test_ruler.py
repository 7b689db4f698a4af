"""RULER task prompts against RULER's current generators (docs/evaluation.md): templates, wording
rules, value types, haystack layout, in-context examples, budgets, scoring and minimum lengths."""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter

import pytest
from transformers import AutoTokenizer

import longlab
from longlab.data.synthetic import NOISE
from longlab.eval import ruler
from longlab.eval.tasks.base import parse_task

TOKENIZER = AutoTokenizer.from_pretrained(longlab.model_path("tiny"))
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
WORD_KEY = r"[a-z]+-[a-z]+"
NEEDLE = re.compile(r"One of the special magic (numbers|uuids) for (\S+?) is: (\S+?)\.(?= |\n|$)")
VT_HEAD = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
CWE_HEAD = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
CWE_TAIL = (
    "\nQuestion: What are the 10 most common words in the above list? "
    "Answer: The top 10 words that appear most often in the list are:"
)


def _tokens(text):
    return len(TOKENIZER(text, add_special_tokens=False)["input_ids"])


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


def _context(prompt):
    return prompt.split("afterwards.\n", 1)[1].rsplit("\nWhat ", 1)[0]


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


@pytest.mark.parametrize("name,line", [("niah_single_1", NOISE), ("niah_multikey_2", None)])
def test_noise_and_needle_haystacks_are_one_sentence_per_line(name, line):
    """RULER joins the noise and needle haystacks with newlines, each needle on a line of its own."""
    sample = _sample(name)
    lines = _context(sample.prompt).split("\n")
    assert len(lines) > 5
    needles = [x for x in lines if NEEDLE.fullmatch(x)]
    if line is not None:
        assert len(needles) == 1 and set(lines) == {line, needles[0]}
    else:
        assert needles == lines
    assert sample.answers[0] in next(x for x in needles if sample.answers[0] in x)


def test_prose_haystack_joins_sentences_with_spaces_and_uses_rulers_depth_grid():
    """RULER's essay haystack stays one paragraph; needles sit at one of its 40 depths."""
    sample = _sample("niah_single_2")
    context = _context(sample.prompt)
    assert "\n" not in context and len(NEEDLE.findall(context)) == 1
    assert sample.meta["depth"] in {d / 100 for d in ruler.DEPTHS} and len(ruler.DEPTHS) == 40


def test_multivalue_asks_four_values_of_one_key_in_plural():
    sample = _sample("niah_multivalue", length=1200)
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
    values = dict((key, value) for _, key, value in found)
    assert sample.answers == [values[key] for key in query.replace(", and ", ", ").split(", ")]


def _vt_parts(prompt):
    assert prompt.startswith(VT_HEAD) and prompt.count(VT_HEAD) == 2
    example, task = prompt[len(VT_HEAD) :].split("\n\n" + VT_HEAD)
    return example, task


def test_variable_tracking_chain_lines_in_rulers_format():
    """ "VAR A = 12345", then "VAR B = VAR A " (trailing space, no period), one per line among noise lines."""
    sample = _sample("vt", length=1100)
    _, task = _vt_parts(sample.prompt)
    context, question = task.split("\nQuestion: ")
    value = re.search(r"^VAR [A-Z]{5} = (\d{5})$", context, flags=re.M).group(1)
    names = sample.answers
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a} " for a, b in itertools.pairwise(names)]
    lines = context.split("\n")
    assert [x for x in lines if x != NOISE] == chain  # in order, each on its own line
    assert lines.count(NOISE) >= 5
    assert question == (
        f"Find all variables that are assigned the value {value} in the text above. "
        f"Answer: According to the chain(s) of variable assignment in the text above, 5 variables are "
        f"assgined the value {value}, they are: "  # RULER's spelling, kept
    )


def test_variable_tracking_prepends_one_solved_example_of_rulers_size():
    sample = _sample("vt", length=1100)
    example, _ = _vt_parts(sample.prompt)
    head, answer = example.rsplit(", they are:  ", 1)  # RULER's prefix ends in a space, then " " + names
    names = answer.split(" ")  # then "\n", and "\n" before the task (split off by _vt_parts)
    assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{3}", n) for n in names)
    value = re.search(r"^VAR [A-Z]{3} = (\d{5})$", head, flags=re.M).group(1)
    assert f"VAR {names[1]} = VAR {names[0]} " in head and f"assgined the value {value}" in head
    assert 400 < _tokens(VT_HEAD + head + ", they are: ") <= ruler.VT_EXAMPLE_TOKENS  # filled to RULER's 500


def _cwe_entries(listing):
    entries = re.findall(r"(\d+)\. (\w+)(?: |$)", listing)
    assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
    return [word for _, word in entries]


@pytest.mark.parametrize("length,example_repeats,repeats", [(1200, (3, 1), (6, 1)), (4096, (10, 3), (30, 3))])
def test_common_words_one_line_list_repeats_and_example(length, example_repeats, repeats):
    sample = _sample("cwe", length=length)
    assert sample.prompt.startswith(CWE_HEAD) and sample.prompt.endswith(CWE_TAIL)
    example, task = sample.prompt[len(CWE_HEAD) :].split("\n" + CWE_HEAD)
    listing, answer = example.split(CWE_TAIL + " ")
    assert "\n" not in listing and "\n" not in answer  # "1. word 2. word ..." on one line
    counts = Counter(_cwe_entries(listing))
    shown = _cwe_entries(answer)
    assert len(shown) == 10 and {counts[w] for w in shown} == {example_repeats[0]}
    assert set(counts.values()) == set(example_repeats) and len(counts) == (20 if length < 4096 else 40)
    body = task.removesuffix(CWE_TAIL)
    assert "\n" not in body
    counts = Counter(_cwe_entries(body))
    assert {counts[w] for w in sample.answers} == {repeats[0]} and len(sample.answers) == 10
    assert {c for w, c in counts.items() if w not in sample.answers} == {repeats[1]}


def test_frequent_words_have_rulers_zipf_counts_with_dots_on_top():
    length = 1500
    sample = _sample("fwe", length=length)
    assert sample.prompt.endswith(ruler.FWE_ANSWER_PREFIX)
    words = sample.prompt.split("coded words. ", 1)[1].split("\nQuestion")[0].split(" ")
    counts = Counter(words)
    ranked = sorted(counts, key=lambda w: -counts[w])
    assert ranked[0] == "..." and all(re.fullmatch(r"[a-z]{6}", w) for w in ranked[1:])
    assert ranked[1:4] == sample.answers
    n = next(n for n in range(len(words), 3 * len(words)) if ruler.fwe_counts(n, length // 50)[0] == counts["..."])
    expected = [c for c in ruler.fwe_counts(n, length // 50) if c]  # int(n * k^-2 / zeta(2)) per rank k
    assert sorted(counts.values(), reverse=True) == expected
    assert ruler.zeta(2.0) == pytest.approx(3.14159265358979**2 / 6, rel=1e-9)


def test_generation_budgets_and_scoring_follow_ruler():
    task = parse_task("ruler")
    budgets = {s.split("/")[1]: task.new_tokens(s) for s in task.subtasks()}
    assert budgets == {**{n: 128 for n in ruler.NEEDLE_TASKS}, "vt": 30, "cwe": 120, "fwe": 50}
    assert not any(task.first_line(s) for s in task.subtasks())  # generation runs to its budget
    sample = _sample("niah_multivalue", length=1200)
    a, b, *_ = sample.answers
    assert task.score("ruler/niah_multivalue", f" {a}\n\nand then {b.upper()}", sample) == 50.0
    assert ruler.postprocess("  A\tB\x01c \n") == "A\nB\nc"


@pytest.mark.parametrize("name", ["niah_single_1", "vt", "cwe", "fwe"])
def test_a_length_too_short_names_the_length_the_task_needs(name):
    with pytest.raises(ValueError, match=rf"RULER {name} needs at least (\d+) tokens") as error:
        _sample(name, length=256)
    needed = int(re.search(r"needs at least (\d+)", str(error.value)).group(1))
    assert needed > 256
    if name != "fwe":  # fwe's minimum also depends on its vocabulary (length // 50)
        sample = _sample(name, length=needed + 40)
        assert _tokens(sample.prompt) + ruler.tokens_to_generate(name) <= needed + 40


@pytest.mark.parametrize("name", ruler.TASKS)
def test_every_task_fits_its_length_and_is_deterministic(name):
    first = _sample(name, length=1200, seed=5)
    assert first == _sample(name, length=1200, seed=5)
    assert _tokens(first.prompt) + ruler.tokens_to_generate(name) <= 1200
