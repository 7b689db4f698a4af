"""Scores for generated answers (docs/evaluation.md)."""

from __future__ import annotations

import re

_INTEGER = re.compile(r"\d+")


def first_integer_matches(output: str, key: str) -> float:
    """Passkey score, as Landmark's script: 1 when the first run of digits anywhere in the output,
    read as an integer, equals the key (so " 007" matches 7; a newline before it does not matter)."""
    found = _INTEGER.search(output)
    return float(found is not None and int(found.group()) == int(key))


def string_match_all(output: str, references: list[str]) -> float:
    """RULER: mean over references of case-insensitive substring match, x100."""
    lowered = output.lower()
    return 100.0 * sum(ref.lower() in lowered for ref in references) / len(references)


def string_match_part(output: str, references: list[str]) -> float:
    """RULER: 100 when any reference is a case-insensitive substring of the output."""
    lowered = output.lower()
    return 100.0 * max(ref.lower() in lowered for ref in references)
