"""The interface every context method implements.

A task's prompt is three texts: the task's instruction, the long context, and the question (with the
answer prefix) that follows it. Extension and cache methods see the prompt whole; a context method
sees the three parts and decides what the model reads -- the chunks it retrieves, one call per chunk,
a compressed context -- then returns the answers. The model it is given is already ``longlab.apply``'d
with the rest of the composition (``rag:top_k=4+yarn:factor=2``), so context methods compose with
position and cache methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from longlab.errors import LonglabError
from longlab.method import Method


@dataclass(frozen=True)
class ContextQuery:
    """One sample's prompt, split: ``instruction + context + question`` is the whole prompt."""

    instruction: str
    context: str
    question: str

    @property
    def prompt(self) -> str:
        return self.instruction + self.context + self.question


@dataclass(frozen=True)
class ContextMethod(Method):
    """A context method. Subclasses are registered frozen dataclasses (``longlab.method.register``)."""

    kind = "context"

    def answer(
        self,
        model: Any,
        tokenizer: Any,
        queries: list[ContextQuery],
        new_tokens: int,
        first_line: bool,
        *,
        chat: bool = False,
    ) -> list[str]:
        """Greedy answers, one per query, as ``longlab.generation.generate_answers`` returns them
        for whole prompts (``first_line``: only the answer's first line). ``chat``: wrap each prompt
        the method builds in the tokenizer's chat template (the runner passes it only when set)."""
        raise NotImplementedError

    def read_length(self, length: int) -> int:
        """The longest prompt (tokens) the model reads for an input of ``length`` tokens -- what a
        position method's reach must cover. Default: the whole input; methods that read chunks or a
        compressed context say less."""
        return length


# Tokens a chunked prompt spends besides its chunks (a task's instruction and question, a chain's
# partial answers): an allowance for read_length, as the chunk prompts themselves are built later.
FRAME_TOKENS = 256


def check_query(method: str, query: ContextQuery) -> None:
    """A context method needs a context to read and a question to ask: a clear error for either missing."""
    if not query.context.strip():
        raise LonglabError(f"{method}: the sample's context is empty; a context method needs text to read")
    if not query.question.strip():
        raise LonglabError(f"{method}: the sample has no question after its context; a context method keeps "
                           "the question whole and needs one")  # fmt: skip
