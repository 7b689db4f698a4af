"""Splitting a context into chunks of a number of tokens, as character spans of the original text, so
chunks put back together (:func:`join_spans`) give the text exactly where they are contiguous."""

from __future__ import annotations

from longlab.errors import LonglabError

GAP = "\n"  # between two kept pieces of a context that were not next to each other


def token_starts(tokenizer, text: str) -> list[int]:
    """The character offset where each token of ``text`` begins (as prompts are encoded: no special
    tokens). Needs a fast tokenizer, the only kind that reports offsets."""
    if not getattr(tokenizer, "is_fast", False):
        raise LonglabError("context methods chunk by tokens through character offsets, which only a fast "
                           "(Rust) tokenizer reports; load the model with its tokenizer.json")  # fmt: skip
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [start for start, _ in offsets]


def chunk_spans(tokenizer, text: str, size: int, overlap: int = 0) -> list[tuple[int, int]]:
    """Character spans (start, end) of consecutive chunks of ``size`` tokens, each starting
    ``size - overlap`` tokens after the previous one. A chunk runs from its first token's start to
    the start of the token after its last (whitespace before a token stays with the token before),
    so the chunks of ``overlap=0`` partition the text; the first starts at 0, the last ends at the end."""
    if not 0 <= overlap < size:
        raise LonglabError(f"a chunk overlap must be >= 0 and below the chunk size {size}, got {overlap}")
    starts = token_starts(tokenizer, text)
    if not starts:
        return [(0, len(text))] if text else []
    bounds = [0, *starts[1:], len(text)]  # bounds[i]: where token i begins; bounds[-1]: the end
    spans, step = [], size - overlap
    for first in range(0, len(starts), step):
        last = min(first + size, len(starts))
        spans.append((bounds[first], bounds[last]))
        if last == len(starts):
            break
    return spans


def chunk_text(tokenizer, text: str, size: int, overlap: int = 0) -> list[str]:
    """The chunks of :func:`chunk_spans` as strings."""
    return [text[a:b] for a, b in chunk_spans(tokenizer, text, size, overlap)]


def join_spans(text: str, spans: list[tuple[int, int]]) -> str:
    """The text of ``spans`` in document order: overlapping or touching spans merge into one piece,
    separate pieces are joined with :data:`GAP`. All of a text's chunks give the text back."""
    pieces: list[list[int]] = []
    for start, end in sorted(spans):
        if pieces and start <= pieces[-1][1]:
            pieces[-1][1] = max(pieces[-1][1], end)
        else:
            pieces.append([start, end])
    return GAP.join(text[a:b] for a, b in pieces)
