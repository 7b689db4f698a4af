"""``refine``: carry a running answer through the chunks."""

from __future__ import annotations

from dataclasses import dataclass

from longlab.context.chains import ChainMethod, map_prompt, refine_prompt
from longlab.context.llm import complete
from longlab.method import register


@register
@dataclass(frozen=True)
class Refine(ChainMethod):
    """Refine (LangChain's ``refine`` chain): the task's prompt is answered on the first chunk; each
    later chunk is read with the answer so far after it ("An earlier answer: ..."), and the model's
    answer there becomes the running answer. Sequential: one model call per chunk, queries of a
    batch side by side."""

    name = "refine"

    def answer(self, model, tokenizer, queries, new_tokens, first_line, *, chat=False):
        chunked = [self.chunks(tokenizer, q) for q in queries]
        answers = complete(model, tokenizer, [map_prompt(q, c[0]) for q, c in zip(queries, chunked, strict=True)],
                           new_tokens, first_line, chat, self.batch)  # fmt: skip
        for step in range(1, max(len(c) for c in chunked)):
            rows = [i for i, c in enumerate(chunked) if step < len(c)]
            prompts = [refine_prompt(queries[i], chunked[i][step], answers[i]) for i in rows]
            for i, refined in zip(rows, complete(model, tokenizer, prompts, new_tokens, first_line, chat, self.batch),
                                  strict=True):  # fmt: skip
                answers[i] = refined
        return answers
