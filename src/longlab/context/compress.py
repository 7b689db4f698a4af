"""``compress``: drop the context's least informative tokens or words, scored by a small LM."""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import re
from dataclasses import dataclass

import torch

from longlab.context.base import FRAME_TOKENS, ContextMethod, ContextQuery, check_query
from longlab.context.chunks import token_starts
from longlab.context.llm import complete
from longlab.errors import SpecError
from longlab.method import check_range, register

UNITS = ("token", "word")
_WORD = re.compile(r"\s*\S+|\s+$")  # a word with the whitespace before it (trailing space: its own unit)


@functools.cache
def scorer_model(name: str, device: str, dtype: torch.dtype):
    """The scoring LM and its tokenizer, loaded once per (name, device, dtype), never patched."""
    from longlab.loading import load

    return load(name, dtype=dtype, device=device)


@torch.no_grad()
def self_information(model, ids: torch.Tensor) -> torch.Tensor:
    """-log p(token | the tokens before it), in nats, for each token of ``ids`` (T,); the first token
    has no prefix and gets +inf (never dropped). Inputs longer than the scorer's training length are
    read in windows of that length advancing by half of it; each token takes its score from the
    window that holds it in its second half (or the first window), so it has at least half a window
    of prefix."""
    window = int(getattr(model.config, "max_position_embeddings", ids.numel()) or ids.numel())
    ids = ids.to(model.device)
    info = torch.full((ids.numel(),), math.inf, device=ids.device, dtype=torch.float32)
    half = max(1, window // 2)
    start = 0
    while True:
        piece = ids[start : start + window]
        if piece.numel() > 1:
            logp = model(input_ids=piece[None], use_cache=False).logits[0, :-1].float().log_softmax(-1)
            scores = -logp.gather(-1, piece[1:, None])[:, 0]  # scores[j]: token start + j + 1
            first = 1 if start == 0 else half  # tokens this window scores (the rest came earlier)
            info[start + first : start + piece.numel()] = scores[first - 1 :]
        if start + window >= ids.numel():
            return info
        start += half


def drop_lowest(info: list[float], sizes: list[int], ratio: float) -> set[int]:
    """Units to drop: the least informative first, skipping a unit that would overshoot, until
    ``ratio`` of all tokens is dropped (or no unit fits the rest of the target)."""
    target = round(ratio * sum(sizes))
    dropped, removed = set(), 0
    for unit in sorted(range(len(info)), key=lambda u: (info[u], u)):
        if removed + sizes[unit] <= target and math.isfinite(info[unit]):
            dropped.add(unit)
            removed += sizes[unit]
            if removed == target:
                break
    return dropped


@register
@dataclass(frozen=True)
class Compress(ContextMethod):
    """Prompt compression by self-information (Li et al., 2023, "Compressing Context to Enhance
    Inference Efficiency of Large Language Models" -- Selective Context -- section 2, eq. 1-3): each
    context token's self-information -log p(x_t | x_<t) under the ``scorer`` LM (the bundled model by
    default, any supported model by name or path; on the evaluated model's device, unpatched); a
    ``word`` sums its tokens' (section 2.2, lexical units); the lowest units are dropped until
    ``ratio`` of the context's tokens (scorer's tokenizer) are gone. Only the context is compressed:
    the instruction and the question stay whole. Selective Context keeps units above a percentile of
    self-information; dropping the lowest up to a token count is the same rule with the ratio met in
    tokens."""

    name = "compress"
    ratio: float = 0.5
    unit: str = "token"
    scorer: str = "tiny"

    def __post_init__(self) -> None:
        check_range(self.name, "ratio", self.ratio)  # a finite number
        if not 0 < self.ratio < 1:  # open at both ends: nothing dropped, or the whole context
            raise SpecError(f"{self.name}: parameter 'ratio' must be a number > 0 and < 1, got {self.ratio!r}")
        if self.unit not in UNITS:
            raise SpecError(f"{self.name}: parameter 'unit' must be one of {', '.join(UNITS)}, got {self.unit!r}")

    def compress(self, scorer, tokenizer, context: str) -> str:
        """The context with its least informative units dropped."""
        starts = token_starts(tokenizer, context)
        if len(starts) < 2:
            return context
        ids = torch.as_tensor(tokenizer(context, add_special_tokens=False)["input_ids"])
        info = self_information(scorer, ids).tolist()
        bounds = [0, *starts[1:], len(context)]
        if self.unit == "token":
            spans, unit_info, sizes = list(itertools.pairwise(bounds)), info, [1] * len(info)
        else:
            spans = [m.span() for m in _WORD.finditer(context)]
            word_starts = [a for a, _ in spans]
            unit_info, sizes = [0.0] * len(spans), [0] * len(spans)
            for token, begin in enumerate(bounds[:-1]):
                word = bisect.bisect_right(word_starts, begin) - 1
                unit_info[word] += info[token]
                sizes[word] += 1
        dropped = drop_lowest(unit_info, sizes, self.ratio)
        return "".join(context[a:b] for u, (a, b) in enumerate(spans) if u not in dropped)

    def prompt(self, model, query: ContextQuery) -> str:
        check_query(self.name, query)
        scorer, scorer_tokenizer = scorer_model(self.scorer, str(model.device), model.dtype)
        return query.instruction + self.compress(scorer, scorer_tokenizer, query.context) + query.question

    def answer(self, model, tokenizer, queries, new_tokens, first_line, *, chat=False):
        prompts = [self.prompt(model, q) for q in queries]
        return complete(model, tokenizer, prompts, new_tokens, first_line, chat, batch=len(prompts))

    def read_length(self, length: int) -> int:
        return min(length, math.ceil((1 - self.ratio) * length) + FRAME_TOKENS)
