"""``map_reduce``: answer per chunk, then combine the partial answers."""

from __future__ import annotations

from dataclasses import dataclass

from longlab.context.chains import ChainMethod, combine_prompt, map_prompt
from longlab.context.llm import complete
from longlab.data.synthetic import token_count
from longlab.method import register


@register
@dataclass(frozen=True)
class MapReduce(ChainMethod):
    """Map-reduce over chunks (LangChain's ``map_reduce`` chain; the MapReduce pattern of Dean &
    Ghemawat, 2004, applied to LLM calls as in Zhou et al., 2024, "LLM x MapReduce", section 3): the
    task's prompt is answered on every chunk (map), then once more with the non-empty partial answers,
    one a line, as the context (combine). Partial answers longer together than ``chunk_size`` tokens
    are combined in groups first, level by level, until one combine prompt holds them (LangChain's
    collapse step)."""

    name = "map_reduce"

    def answer(self, model, tokenizer, queries, new_tokens, first_line, *, chat=False):
        out = []
        for query in queries:
            chunks = self.chunks(tokenizer, query)
            partial = complete(model, tokenizer, [map_prompt(query, c) for c in chunks], new_tokens, first_line,
                               chat, self.batch)  # fmt: skip
            if len(chunks) == 1:
                out.append(partial[0])
                continue
            out.append(self.combine(model, tokenizer, query, partial, new_tokens, first_line, chat))
        return out

    def combine(self, model, tokenizer, query, partial, new_tokens, first_line, chat) -> str:
        answers = [a.strip() for a in partial if a.strip()]
        if not answers:
            return ""  # no chunk gave an answer: there is nothing to combine
        while True:
            groups = self.groups(tokenizer, answers)
            prompts = [combine_prompt(query, group) for group in groups]
            combined = complete(model, tokenizer, prompts, new_tokens, first_line, chat, self.batch)
            if len(groups) == 1:
                return combined[0]
            answers = [a.strip() for a in combined if a.strip()] or [""]

    def groups(self, tokenizer, answers: list[str]) -> list[list[str]]:
        """Consecutive groups of answers, each within ``chunk_size`` tokens, at least two to a group
        (so every level shrinks the list)."""
        groups: list[list[str]] = [[]]
        used = 0
        for answer in answers:
            size = token_count(tokenizer, answer) + 1
            if len(groups[-1]) >= 2 and used + size > self.chunk_size:
                groups.append([])
                used = 0
            groups[-1].append(answer)
            used += size
        if len(groups) > 1 and len(groups[-1]) == 1:  # a lone answer joins the group before it
            lone = groups.pop()
            groups[-1] += lone
        return groups
