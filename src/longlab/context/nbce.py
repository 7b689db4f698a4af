"""``nbce``: Naive Bayes-based Context Extension -- per-chunk next-token distributions, pooled."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, TopPLogitsWarper

import longlab.context.rows as chunks
from longlab.context.base import ContextQuery
from longlab.method import check_range, register

FLOOR = -100.0  # the reference code's clip: log-probabilities below it count as "truncated"


def combine(logits: torch.Tensor, beta: float, top_p: float) -> torch.Tensor:
    """NBCE's pooled next-token log-scores (V,) from logits (1 + n, V): row 0 read without context,
    rows 1..n each with one chunk (Su 2023, kexue.fm/archives/9617, eq. "log p(T|S_1..S_n) =
    (β+1) pool_k log p(T|S_k) − β log p(T)", pool = the chunk whose distribution has the least entropy).

    As the reference code (github.com/bojone/NBCE, test.py): log-softmax per row, top-p truncation
    per row (``top_p`` = 1 keeps every token), entropy with log-probabilities clipped at -100, the
    minimum-entropy chunk k, then ``(1 + β) log p_k − β log p_0`` where the context-free log-probability
    is above -100, else ``log p_k`` alone."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if top_p < 1:
        logp = TopPLogitsWarper(top_p)(None, logp)
    entropy = -(logp.exp() * logp.clamp(FLOOR, 0)).sum(dim=-1)
    k = int(entropy[1:].argmin()) + 1
    pooled, free = logp[k], logp[0]
    return torch.where(free > FLOOR, (1 + beta) * pooled - beta * free, pooled)


@register
@dataclass(frozen=True)
class NBCE(chunks.RowReader):
    """Naive Bayes-based Context Extension (Su, 2023, "NBCE: 使用朴素贝叶斯扩展LLM的Context处理长度",
    kexue.fm/archives/9617; Su et al., NAACL 2024, arXiv 2403.17552, section 3): the context is cut
    into chunks S_1..S_n; each is read alone with the question, batched as rows (``instruction + S_k
    + question``), beside one row without context (``instruction + question``). At every decoding step
    the rows' next-token distributions are combined by :func:`combine`: log p(T|S_1..S_n) =
    (β + 1) · pool_k log p(T|S_k) − β · log p(T), pool = the minimum-entropy chunk; the greedy token
    is fed to every row. ``beta`` = β (0.25 in the reference), ``top_p`` the reference's per-row
    truncation (0.95), ``chunk``: context tokens per chunk (default: what the training length leaves
    after the instruction, question and answer budget). Composes with position and cache methods: the
    rows are decoded by the model as ``longlab.apply`` prepared it."""

    name = "nbce"
    beta: float = 0.25
    top_p: float = 0.95
    chunk: int | None = None

    def __post_init__(self) -> None:
        check_range(self.name, "beta", self.beta, low=0)
        check_range(self.name, "top_p", self.top_p, low=0, high=1, low_open=True)
        check_range(self.name, "chunk", self.chunk, low=1, integer=True)

    @property
    def chunk_tokens(self) -> int | None:
        return self.chunk

    @torch.no_grad()
    def answer_one(self, model, tokenizer, query: ContextQuery, new_tokens: int, first_line: bool) -> str:
        device = model.get_input_embeddings().weight.device
        instruction, context, question = chunks.encode_parts(tokenizer, query, device)
        overhead = instruction.numel() + question.numel() + new_tokens
        parts = chunks.split(self.name, context, chunks.chunk_length(self.name, self.chunk, model, overhead))
        rows = [torch.cat((instruction, question))] + [torch.cat((instruction, p, question)) for p in parts]
        ids, mask, positions = chunks.left_padded(rows, chunks.pad_id(tokenizer))
        cache = DynamicCache()
        tokens: list[int] = []
        for _ in range(new_tokens):
            logits = chunks.forward(model, cache, input_ids=ids, attention_mask=mask, position_ids=positions).logits
            token = combine(logits[:, -1], self.beta, self.top_p).argmax()
            tokens.append(int(token))
            if chunks.done(tokenizer, tokens, first_line):
                break
            ids = token.expand(len(rows), 1)
            mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
            positions = positions[:, -1:] + 1
        return chunks.finish(tokenizer, tokens, first_line)
