"""``pcw``: Parallel Context Windows -- windows prefilled apart at reused positions, one cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

import longlab.context.rows as chunks
from longlab.cache.entries import Entries
from longlab.cache.layer import LonglabLayer
from longlab.context.base import ContextQuery
from longlab.errors import LonglabError
from longlab.method import check_range, register


@register
@dataclass(frozen=True)
class PCW(chunks.RowReader):
    """Parallel Context Windows (Ratner et al., 2023, "Parallel Context Windows for Large Language
    Models", section 2, eq. 1-2): the context is cut into windows; each window's tokens attend only
    within their window, at positions 0 .. N-1 reused by every window; the task tokens (here the
    question and the answer) sit at positions N, N+1, ... (N the longest window) and attend to every
    window and to each other.

    longlab caches unrotated keys with their positions, so the pattern needs no new mask: the windows
    are prefilled as rows of one batch (each row its own window, positions restarting at 0), the rows'
    cache entries are concatenated per layer into one cache, and the task tokens are decoded over it.
    Every window is ``instruction + chunk``: the task line is the start of the model's input in every
    window, as in the prompt it was trained on. ``window``: context tokens per window; by default what
    the training length leaves after the instruction, question and answer budget. The cache policy of
    the composition compresses each window's entries as they are written (a budget then holds per
    window while prefilling, and over the merged cache while decoding).
    """

    name = "pcw"
    window: int | None = None

    def __post_init__(self) -> None:
        check_range(self.name, "window", self.window, low=1, integer=True)

    @property
    def chunk_tokens(self) -> int | None:
        return self.window

    def windows(
        self, model: Any, tokenizer: Any, query: ContextQuery, new_tokens: int
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The windows (``instruction + chunk``, 1-D ids) and the task tokens (the question) of a query."""
        device = model.get_input_embeddings().weight.device
        instruction, context, question = chunks.encode_parts(tokenizer, query, device)
        overhead = instruction.numel() + question.numel() + new_tokens
        parts = chunks.split(self.name, context, chunks.chunk_length(self.name, self.window, model, overhead))
        return [torch.cat((instruction, part)) for part in parts], question

    @torch.no_grad()
    def answer_one(self, model, tokenizer, query: ContextQuery, new_tokens: int, first_line: bool) -> str:
        windows, question = self.windows(model, tokenizer, query, new_tokens)
        cache = prefill_windows(model, windows, chunks.pad_id(tokenizer))
        start = max(w.numel() for w in windows)  # the task tokens follow the longest window
        return greedy(model, tokenizer, cache, question, start, new_tokens, first_line)


def prefill_windows(model, windows: list[torch.Tensor], pad: int) -> DynamicCache:
    """One cache holding every window, each prefilled alone at positions 0 .. len - 1."""
    ids, mask, positions = chunks.left_padded(windows, pad)
    cache = DynamicCache()
    chunks.forward(model, cache, input_ids=ids, attention_mask=mask, position_ids=positions)
    merged = DynamicCache()
    merged.layers.extend(merge_rows(layer) for layer in cache.layers)
    return merged


def merge_rows(layer: Any) -> LonglabLayer:
    """A one-row cache layer holding the real entries of every batch row of ``layer``, row after row
    (positions repeat across rows: each entry keeps its own; padding entries are dropped)."""
    if not isinstance(layer, LonglabLayer):
        raise LonglabError(
            "pcw concatenates longlab cache layers (unrotated keys with positions); the model's cache layer is "
            f"{type(layer).__name__}: pass a model prepared with longlab.apply(model, ...)"
        )
    entries = layer.entries
    if type(entries) is not Entries:
        raise LonglabError(
            f"pcw cannot concatenate the windows' caches under cache policy {layer.policy.name!r} (its entries are "
            f"{type(entries).__name__}); compose pcw with an eviction policy or none"
        )
    fields = {name: entries.dense(name) for name in entries.fields}  # (n, Hk, W, ...)
    n, hk, w = fields["positions"].shape
    rows = {name: x.transpose(0, 1).reshape(1, hk, n * w, *x.shape[3:]) for name, x in fields.items()}
    real = rows["positions"] >= 0  # (1, Hk, n * W): drop left padding and evicted slots
    packed = {name: x[real] for name, x in rows.items()}
    merged = LonglabLayer(layer.policy, layer.sliding_window)
    merged.lazy_initialization(fields["keys"], fields["values"])
    merged.entries = Entries(1, hk, packed, real.sum(dim=-1).flatten())
    merged.valid_seen = layer.valid_seen.sum().reshape(1)
    merged.seen = int(merged.valid_seen)
    return merged


def greedy(model, tokenizer, cache, prompt: torch.Tensor, start: int, new_tokens: int, first_line: bool) -> str:
    """Greedy answer to ``prompt`` (1-D ids) read at positions ``start, start + 1, ...`` over ``cache``."""
    tokens: list[int] = []
    ids = prompt[None]
    position = start
    for _ in range(new_tokens):
        positions = torch.arange(position, position + ids.shape[1], device=ids.device)[None]
        logits = chunks.forward(model, cache, input_ids=ids, position_ids=positions).logits
        position += ids.shape[1]
        ids = logits[:, -1].argmax(dim=-1, keepdim=True)
        tokens.append(int(ids))
        if chunks.done(tokenizer, tokens, first_line):
            break
    return chunks.finish(tokenizer, tokens, first_line)
