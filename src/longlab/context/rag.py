"""``rag``: retrieve the chunks of the context most relevant to the question, prompt with them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from longlab.context.base import FRAME_TOKENS, ContextMethod, ContextQuery, check_query
from longlab.context.chunks import chunk_spans, join_spans
from longlab.context.llm import complete
from longlab.context.retrievers import RETRIEVERS, scores, top_k
from longlab.errors import SpecError
from longlab.method import check_order, check_range, register


@register
@dataclass(frozen=True)
class Rag(ContextMethod):
    """Retrieval-augmented generation over the sample's own context (Lewis et al., 2020, "Retrieval-
    Augmented Generation for Knowledge-Intensive NLP Tasks", section 2; applied to long inputs as in
    Xu et al., 2024, "Retrieval meets Long Context Large Language Models", section 3): the context is
    cut into chunks of ``chunk_size`` tokens sharing ``overlap`` tokens, each scored against the
    question by ``retriever`` (``bm25``: Okapi BM25; ``dense``: WordLlama cosine similarity;
    ``hybrid``: ``weight`` x dense + (1 - weight) x BM25 of min-max normalised scores), and the
    ``top_k`` best are put back in document order -- touching chunks merged, gaps marked by a newline
    -- between the task's instruction and question (docs/context.md). The retrieval query is the
    question text; ``top_k`` covering every chunk gives the plain prompt."""

    name = "rag"
    chunk_size: int = 256
    overlap: int = 0
    top_k: int = 4
    retriever: str = "bm25"
    weight: float = 0.5

    def __post_init__(self) -> None:
        check_range(self.name, "chunk_size", self.chunk_size, low=1, integer=True)
        check_range(self.name, "overlap", self.overlap, low=0, integer=True)
        check_order(self.name, "overlap", self.overlap, "chunk_size", self.chunk_size, strict=True)
        check_range(self.name, "top_k", self.top_k, low=1, integer=True)
        check_range(self.name, "weight", self.weight, low=0, high=1)
        if self.retriever not in RETRIEVERS:
            raise SpecError(f"{self.name}: parameter 'retriever' must be one of "
                            f"{', '.join(RETRIEVERS)}, got {self.retriever!r}")  # fmt: skip

    def retrieve(self, tokenizer: Any, query: ContextQuery) -> list[int]:
        """Indices of the retrieved chunks, in document order."""
        check_query(self.name, query)
        spans = chunk_spans(tokenizer, query.context, self.chunk_size, self.overlap)
        chunks = [query.context[a:b] for a, b in spans]
        return top_k(scores(self.retriever, query.question, chunks, self.weight), self.top_k)

    def prompt(self, tokenizer: Any, query: ContextQuery) -> str:
        """The prompt the model reads: instruction, the retrieved chunks, question."""
        spans = chunk_spans(tokenizer, query.context, self.chunk_size, self.overlap)
        kept = [spans[i] for i in self.retrieve(tokenizer, query)]
        return query.instruction + join_spans(query.context, kept) + query.question

    def answer(self, model, tokenizer, queries, new_tokens, first_line, *, chat=False):
        prompts = [self.prompt(tokenizer, q) for q in queries]
        return complete(model, tokenizer, prompts, new_tokens, first_line, chat, batch=len(prompts))

    def read_length(self, length: int) -> int:
        return min(length, self.top_k * self.chunk_size + FRAME_TOKENS)
