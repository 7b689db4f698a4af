"""What the chunk-reading context methods (``pcw``, ``nbce``) share: a query's three parts as token
ids, the context cut into chunks that fit the training length, left-padded batches with positions
that restart in every row, and the stopping rule of :func:`longlab.generation.generate_answers`."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch

from longlab.context.base import FRAME_TOKENS, ContextMethod, ContextQuery
from longlab.errors import LonglabError


def encode_parts(tokenizer, query: ContextQuery, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(instruction, context, question) as 1-D token ids on ``device``, each part encoded alone
    (no special tokens), so that chunks of the context can be placed between the other two."""
    return tuple(
        tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0].to(device)
        for text in (query.instruction, query.context, query.question)
    )


def training_length(model) -> int:
    """The length the model was trained at (``original_max_position_embeddings`` when the config
    already extends it, else ``max_position_embeddings``)."""
    config = model.config
    params = dict(getattr(config, "rope_parameters", None) or {})
    return int(params.get("original_max_position_embeddings") or config.max_position_embeddings)


def chunk_length(method: str, fixed: int | None, model, overhead: int) -> int:
    """Context tokens per chunk: ``fixed``, or what the training length leaves after ``overhead``
    tokens (instruction, question and answer budget), so no position exceeds the training length."""
    length = fixed if fixed is not None else training_length(model) - overhead
    if length < 1:
        raise LonglabError(
            f"{method}: the instruction, question and answer budget take {overhead} tokens, leaving no room "
            f"for context within the training length {training_length(model)}; give the chunk length explicitly"
        )
    return length


def split(method: str, context: torch.Tensor, length: int) -> list[torch.Tensor]:
    """The context ids cut into the fewest chunks of at most ``length`` tokens, as equal as possible."""
    if context.numel() == 0:
        raise LonglabError(f"{method}: the query's context is empty; there is nothing to split into chunks")
    return list(torch.tensor_split(context, math.ceil(context.numel() / length)))


def left_padded(rows: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, attention mask and position ids (n, W) of 1-D rows left-padded to the longest; each row's
    real tokens sit at positions 0 .. len - 1 (padding at 0: masked, never read)."""
    width = max(row.numel() for row in rows)
    device = rows[0].device
    ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        ids[i, width - row.numel() :] = row
        mask[i, width - row.numel() :] = 1
    positions = (torch.cumsum(mask, dim=1) - 1).clamp(min=0)
    return ids, mask, positions


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def done(tokenizer, tokens: list[int], first_line: bool) -> bool:
    """Whether greedy decoding stops after ``tokens``: at the end-of-sequence token, or with
    ``first_line`` once the answer has a newline after its first text (generate_answers' rule)."""
    if tokens and tokens[-1] == tokenizer.eos_token_id:
        return True
    return first_line and "\n" in tokenizer.decode(tokens).lstrip("\n")


def finish(tokenizer, tokens: list[int], first_line: bool) -> str:
    """The answer text as :func:`longlab.generation.generate_answers` returns it."""
    answer = tokenizer.decode(tokens, skip_special_tokens=True)
    return answer.lstrip("\n").split("\n")[0] if first_line else answer


def forward(model, cache, **inputs: torch.Tensor):
    """``model(**inputs)`` writing ``cache``, under the argument name this transformers uses for it
    (``cache`` from 5.24, which deprecates ``past_key_values``; a wrapped forward keeps the old name)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return model(**inputs, **{name: cache}, use_cache=True)


class RowReader(ContextMethod):
    """A context method that answers one query at a time from its parts' raw token ids, one chunk of
    ``chunk_tokens`` context tokens per row (pcw, nbce)."""

    @property
    def chunk_tokens(self) -> int | None:
        """Context tokens per chunk; None: what the training length leaves after the other parts."""
        raise NotImplementedError

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
        if chat:  # the chunks are placed between the parts' token ids; a template would have to wrap each row
            raise LonglabError(f"{self.name} reads the prompt's parts as raw tokens and has no chat form; drop --chat")
        return [self.answer_one(model, tokenizer, query, new_tokens, first_line) for query in queries]

    def answer_one(self, model: Any, tokenizer: Any, query: ContextQuery, new_tokens: int, first_line: bool) -> str:
        raise NotImplementedError

    def read_length(self, length: int) -> int:
        # the default chunk fills what the training length leaves: within every position method's reach
        return min(length, (self.chunk_tokens or 0) + FRAME_TOKENS)
