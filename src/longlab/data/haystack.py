"""Haystacks: the text needles hide in.

``noise`` repeats the passkey filler sentence group; ``prose`` is English text split into sentences
-- by default the reference manual that ships with Python (``pydoc_data.topics``), or every .txt file
of a folder given with ``--haystack DIR``.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from longlab.data.synthetic import NOISE
from longlab.errors import LonglabError

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@functools.cache
def prose_sentences(folder: str | None = None) -> tuple[str, ...]:
    """Sentences of the prose haystack, in a fixed order, whitespace collapsed."""
    if folder is None:
        from pydoc_data.topics import topics

        texts = [topics[key] for key in sorted(topics)]
    else:
        check_folder(folder)
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(Path(folder).glob("*.txt"))]
    sentences = []
    for text in texts:
        for sentence in _SENTENCE_END.split(" ".join(text.split())):
            if len(sentence) > 20 and sentence[0].isalpha():
                sentences.append(sentence)
    if not sentences:
        raise LonglabError(f"haystack folder {folder!r} holds no sentence to build a haystack from (its .txt files "
                           "are empty or hold no sentence of over 20 characters starting with a letter)")  # fmt: skip
    return tuple(sentences)


def check_folder(folder: str) -> None:
    """A haystack folder exists and holds .txt files; else a clear error."""
    path = Path(folder)
    if not path.is_dir():
        raise LonglabError(f"haystack {folder!r} must be a folder of .txt files; it is not a folder")
    if not any(p.is_file() for p in path.glob("*.txt")):
        raise LonglabError(f"haystack folder {folder!r} holds no .txt files")


def filler(kind: str, n: int, start: int = 0, folder: str | None = None) -> list[str]:
    """``n`` filler units: noise sentence groups, or consecutive prose sentences from ``start``."""
    if kind == "noise":
        return [NOISE] * n
    if kind == "prose":
        sentences = prose_sentences(folder)
        return [sentences[(start + i) % len(sentences)] for i in range(n)]
    raise LonglabError(f"haystack must be 'noise' or 'prose', got {kind!r}")
