"""``kvzip``: keep what the model needs to repeat its context (Kim et al., 2025)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longlab.cache.policy import EvictionPolicy, ScoreContext, keep_top
from longlab.errors import SpecError
from longlab.method import check_range, register

ALLOCATIONS = ("global", "layer", "head")


@register
@dataclass(frozen=True)
class KVzip(EvictionPolicy):
    """KVzip (Kim et al., 2025, "KVzip: Query-Agnostic KV Cache Compression with Context
    Reconstruction", section 3 (method) with its long-context scaling; kvpress's ``KVzipPress``).
    After the context is cached, the model reads a repeat prompt ("Repeat the previous context
    exactly.") followed by the context itself, teacher-forced, over the full cache; each cached pair's
    score is the largest attention probability any of those reconstruction queries gives it, over the
    queries and the query heads sharing its KV head. Contexts longer than ``span`` tokens are
    reconstructed one span at a time (the paper's chunked scoring): span i's prompt asks to repeat
    "starting with" the last ``tail`` tokens of span i−1, and its softmax runs over the first ``sinks``
    entries, span i's cached entries and the reconstruction tokens themselves, so scoring memory is
    O(span²) (kvpress's chunk of 2048 and postfix of 8).

    ``allocation`` shares the kept count as the paper's non-uniform budget: ``global`` (default)
    keeps the best scores across every layer and head, ``layer`` across one layer's heads (kvpress's
    ``layerwise``), ``head`` the best ``budget`` of each head (SnapKV's uniform budget); the total is
    the same target × KV heads × layers in every case.

    Scoring needs the model, the tokenizer and the context's tokens, which a cache policy does not
    see: forward calls keep every entry, and :func:`longlab.cache.reconstruction.compress_with_reconstruction`
    scores and evicts (docs/cache.md). Generated tokens are then appended, as in the paper (the
    context is compressed once). Query-agnostic."""

    name = "kvzip"
    span: int = 2048
    tail: int = 8
    sinks: int = 4
    allocation: str = "global"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self.name, "span", self.span, low=1, integer=True)
        check_range(self.name, "tail", self.tail, low=0, integer=True)
        check_range(self.name, "sinks", self.sinks, low=0, integer=True)
        if self.allocation not in ALLOCATIONS:
            raise SpecError(
                f"{self.name}: parameter 'allocation' must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}"
            )

    def compress(self, ctx: ScoreContext) -> None:
        """Forward calls keep everything: the scores come from the reconstruction pass."""

    def count(self, seen: int) -> int:
        """Entries to keep per head, on average, from a context of ``seen`` tokens."""
        if self.budget is not None:
            return min(seen, self.budget)
        return math.ceil((1 - self.ratio) * seen)

    def keep_masks(self, scores: list[torch.Tensor], valid: list[torch.Tensor]) -> list[torch.Tensor]:
        """Which entries each layer keeps, from its reconstruction scores (B, Hk, N) and valid masks."""
        b, hk, n = scores[0].shape
        target = torch.full((b,), self.count(n), dtype=torch.long, device=scores[0].device)
        if self.allocation == "head":
            return [keep_top(s, v, target) for s, v in zip(scores, valid, strict=True)]
        if self.allocation == "layer":
            return [
                keep_top(s.reshape(b, 1, -1), v.reshape(b, 1, -1), target * hk).view(b, hk, -1)
                for s, v in zip(scores, valid, strict=True)
            ]
        every = torch.cat([s.reshape(b, 1, -1) for s in scores], dim=2)
        pooled = keep_top(every, torch.cat([v.reshape(b, 1, -1) for v in valid], dim=2), target * hk * len(scores))
        return list(pooled.view(b, len(scores), hk, -1).unbind(dim=1))
