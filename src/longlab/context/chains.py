"""What the three chunk chains (``map_reduce``, ``refine``, ``map_rerank``) share: their parameters,
the chunking of a query and the prompts, as LangChain defines the chains (``load_qa_chain``'s
chain types, LangChain documentation, 2023) but worded for a base model: each prompt is the task's
own prompt -- instruction, a context, question -- with the chain's material as that context, so a
model that was never instruction-tuned reads a format it knows (docs/context.md lists them)."""

from __future__ import annotations

from dataclasses import dataclass

from longlab.context.base import FRAME_TOKENS, ContextMethod, ContextQuery, check_query
from longlab.context.chunks import chunk_text
from longlab.method import check_order, check_range

# map_reduce's combine step: the partial answers, one a line, stand in for the context
COMBINE_CONTEXT = "Answers found in parts of the text:\n{answers}"
# refine: the running answer follows the new chunk, so a chunk with nothing new lets it be copied
REFINE_CONTEXT = "{chunk}\nAn earlier answer: {answer}"


def map_prompt(query: ContextQuery, chunk: str) -> str:
    """The task's prompt over one chunk (every chain's first step)."""
    return query.instruction + chunk + query.question


def combine_prompt(query: ContextQuery, answers: list[str]) -> str:
    return query.instruction + COMBINE_CONTEXT.format(answers="\n".join(answers)) + query.question


def refine_prompt(query: ContextQuery, chunk: str, answer: str) -> str:
    return query.instruction + REFINE_CONTEXT.format(chunk=chunk, answer=answer.strip()) + query.question


@dataclass(frozen=True)
class ChainMethod(ContextMethod):
    """A chain over chunks of ``chunk_size`` tokens sharing ``overlap``; ``batch`` chunk prompts go
    to the model per generate() call. A context of one chunk is the plain prompt, answered once."""

    chunk_size: int = 256
    overlap: int = 0
    batch: int = 8

    def __post_init__(self) -> None:
        check_range(self.name, "chunk_size", self.chunk_size, low=1, integer=True)
        check_range(self.name, "overlap", self.overlap, low=0, integer=True)
        check_order(self.name, "overlap", self.overlap, "chunk_size", self.chunk_size, strict=True)
        check_range(self.name, "batch", self.batch, low=1, integer=True)

    def chunks(self, tokenizer, query: ContextQuery) -> list[str]:
        check_query(self.name, query)
        return chunk_text(tokenizer, query.context, self.chunk_size, self.overlap)

    def read_length(self, length: int) -> int:
        return min(length, self.chunk_size + FRAME_TOKENS)
