"""Synthetic task generators: exact templates (docs/evaluation.md), token budgets, determinism."""

from __future__ import annotations

import random
import re

import pytest
from transformers import AutoTokenizer

import longlab
from longlab.data import synthetic
from longlab.eval.scoring import first_integer_matches, string_match_all, string_match_part

TOKENIZER = AutoTokenizer.from_pretrained(longlab.model_path("tiny"))


def _tokens(text: str) -> int:
    return len(TOKENIZER(text, add_special_tokens=False)["input_ids"])


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@pytest.mark.parametrize("length", [128, 512, 1000])
def test_passkey_follows_the_landmark_format(length):
    sample = synthetic.passkey(TOKENIZER, length, random.Random(length), depth=0.5)
    key = sample.answers[0]
    assert re.fullmatch(r"[1-9]\d*", key) and 1 <= int(key) <= 50000
    lines = sample.prompt.split("\n")
    assert lines[0] == (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there."
    )
    assert lines[2] == f"The pass key is {key}. Remember it. {key} is the pass key."
    assert lines[-1] == "What is the pass key? The pass key is"
    garbage = " ".join([FILLER] * 100)  # Landmark: both garbage lines are prefixes of the repeated filler
    assert garbage.startswith(lines[1]) and garbage.startswith(lines[3]) and len(lines) == 5
    assert abs(len(lines[1]) - len(lines[3])) <= 1  # depth 0.5: half the garbage characters before
    assert length - 8 - 4 <= _tokens(sample.prompt) <= length - 8  # filled to the character, budget included


def test_passkey_keys_are_landmarks_random_integers_unless_digits_are_given():
    rng = random.Random(0)
    keys = [int(synthetic.passkey(TOKENIZER, 96, rng).answers[0]) for _ in range(60)]
    assert all(1 <= k <= 50000 for k in keys) and min(keys) < 10000 and len(set(keys)) == 60
    rng = random.Random(0)
    assert all(re.fullmatch(r"\d{7}", synthetic.passkey(TOKENIZER, 96, rng, digits=7).answers[0]) for _ in range(10))


def test_passkey_garbage_is_cut_by_characters_as_landmark_does():
    cuts = []
    for seed in range(8):
        lines = synthetic.passkey(TOKENIZER, 300, random.Random(seed)).prompt.split("\n")
        cuts += [lines[1], lines[3]]
    assert any(cut and not cut.endswith("again.") for cut in cuts)  # a cut inside the sentence group
    assert synthetic.landmark_garbage(25) == " ".join([FILLER] * 2)[:25]


def test_passkey_sentence_garbage_keeps_the_format_the_bundled_model_was_trained_on():
    sample = synthetic.passkey(TOKENIZER, 400, random.Random(9), digits=5, garbage="sentences")
    key, lines = sample.answers[0], sample.prompt.split("\n")
    assert re.fullmatch(r"\d{5}", key)
    assert set(lines[1].split(FILLER)) <= {"", " "} and set(lines[3].split(FILLER)) <= {"", " "}
    with pytest.raises(ValueError, match="garbage must be"):
        synthetic.passkey(TOKENIZER, 400, random.Random(9), garbage="words")


def test_passkey_depth_places_the_needle():
    early = synthetic.passkey(TOKENIZER, 800, random.Random(1), depth=0.0).prompt
    late = synthetic.passkey(TOKENIZER, 800, random.Random(1), depth=1.0).prompt
    assert early.index("The pass key is") < 200 < len(late) - 200 < late.index("The pass key is")


def test_niah_single_uses_ruler_singular_wording():
    sample = synthetic.niah_single(TOKENIZER, 600, random.Random(3))
    value = sample.answers[0]
    key = re.search(r"for (\S+) is: ", sample.prompt).group(1)
    assert re.fullmatch(r"[a-z]+-[a-z]+", key) and re.fullmatch(r"\d{7}", value)
    assert sample.prompt.startswith(
        "A special magic number is hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the number afterwards.\n"
    )
    assert f"One of the special magic numbers for {key} is: {value}." in sample.prompt
    assert sample.prompt.endswith(
        f"\nWhat is the special magic number for {key} mentioned in the provided text?"
        f" The special magic number for {key} mentioned in the provided text is"
    )


def test_generators_are_deterministic_and_fit_their_budget():
    for generate in (synthetic.passkey, synthetic.niah_single, synthetic.variable_tracking, synthetic.common_words):
        first = generate(TOKENIZER, 400, random.Random(9))
        assert first == generate(TOKENIZER, 400, random.Random(9))
        assert _tokens(first.prompt) <= 400


def test_a_length_too_short_for_the_template_is_refused():
    with pytest.raises(ValueError, match="cannot hold even the template"):
        synthetic.variable_tracking(TOKENIZER, 60, random.Random(0))


def test_scores_match_hand_checked_cases():
    assert first_integer_matches(" 12345. Remember", "12345") == 1.0
    assert first_integer_matches(" 007.", "7") == 1.0  # Landmark compares integers
    assert first_integer_matches("\n\nThe pass key is 4321.", "4321") == 1.0  # anywhere in the output
    assert first_integer_matches(" 1234 then 12345", "12345") == 0.0
    assert first_integer_matches(" no number", "12345") == 0.0
    assert string_match_all("The values are 11 and 22", ["11", "22", "33"]) == pytest.approx(200 / 3)
    assert string_match_part("The values are 11 and 22", ["11", "33"]) == 100.0
    assert string_match_all("UUID ABC-def", ["abc-DEF"]) == 100.0
