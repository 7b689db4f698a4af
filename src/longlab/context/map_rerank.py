"""``map_rerank``: answer per chunk with a confidence, keep the most confident."""

from __future__ import annotations

from dataclasses import dataclass

from longlab.context.chains import ChainMethod, map_prompt
from longlab.context.llm import answer_logprob, complete
from longlab.method import register


@register
@dataclass(frozen=True)
class MapRerank(ChainMethod):
    """Map-rerank (LangChain's ``map_rerank`` chain): the task's prompt is answered on every chunk,
    each answer scored, the best kept. LangChain asks an instruction-tuned model to state a score; a
    base model cannot, so the score is the model's own mean log-probability per token of its answer
    given the chunk's prompt (the length-normalised sequence likelihood of Malinin & Gales, 2021,
    "Uncertainty Estimation in Autoregressive Structured Prediction", eq. 12). Ties and empty answers
    (score -inf): the earlier chunk."""

    name = "map_rerank"

    def answer(self, model, tokenizer, queries, new_tokens, first_line, *, chat=False):
        out = []
        for query in queries:
            prompts = [map_prompt(query, c) for c in self.chunks(tokenizer, query)]
            answers = complete(model, tokenizer, prompts, new_tokens, first_line, chat, self.batch)
            if len(answers) == 1:
                out.append(answers[0])
                continue
            scores = [answer_logprob(model, tokenizer, p, a, chat) for p, a in zip(prompts, answers, strict=True)]
            out.append(answers[max(range(len(answers)), key=lambda i: (scores[i], -i))])
        return out
