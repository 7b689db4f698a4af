"""Head-aware cache policies: some KV heads keep every token, the others a short cache.

DuoAttention and RazorAttention decide *per KV head*, once per model, whether the head retrieves from
the whole context (its cache is kept whole) or only reads locally (sinks + recent tokens). The
decision comes from a measurement with the model itself before it runs (``longlab.bridge.heads``),
handed to the policy as a (layers, KV heads) boolean table; each cache layer then gets its own row
(:meth:`HeadAwarePolicy.for_layer`). Heads that hold different counts are stored packed
(``longlab.cache.entries``), so a streaming head's evicted tokens are freed memory.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from longlab.cache.policy import CachePolicy, keep_top, protect
from longlab.errors import LonglabError
from longlab.method import check_range


@dataclass(frozen=True)
class HeadAwarePolicy(CachePolicy):
    """A policy whose KV heads are split into retrieval heads (full cache) and local heads.

    ``procedure`` names the measurement in ``longlab.bridge.heads`` that scores the heads; ``apply``
    runs it (or reads its cached result) and installs :meth:`with_retrieval`'s copy. The table is not
    a spec parameter: it is derived from the model, like ``original_length``.
    """

    procedure: ClassVar[str] = ""

    def check_fraction(self, param: str, value: float) -> None:
        check_range(self.name, param, value, low=0, high=1)

    def streaming_count(self, heads: int) -> int:
        """How many of ``heads`` KV heads (all layers together) become local heads."""
        raise NotImplementedError

    def with_retrieval(self, retrieval: torch.Tensor) -> HeadAwarePolicy:
        """A copy of the policy that keeps heads ``retrieval`` (layers, KV heads) bool whole."""
        policy = copy.copy(self)
        object.__setattr__(policy, "_retrieval", retrieval.bool().cpu())
        return policy

    def from_scores(self, scores: torch.Tensor) -> HeadAwarePolicy:
        """The copy whose local heads are the :meth:`streaming_count` lowest-scored (layers, KV heads);
        ties go to the earlier head, so the choice is deterministic."""
        flat = scores.flatten().double()
        streaming = keep_top(-flat.view(1, 1, -1), torch.ones(1, 1, flat.numel(), dtype=torch.bool),
                             torch.tensor([self.streaming_count(flat.numel())]))  # fmt: skip
        return self.with_retrieval(~streaming.view(scores.shape))

    @property
    def retrieval(self) -> torch.Tensor:
        table = getattr(self, "_retrieval", None)
        if table is None:
            raise LonglabError(
                f"{self.name} decides per KV head from scores measured on the model; install it with "
                f"longlab.apply(model, {str(self)!r}), which measures (or reads) them first"
            )
        return table

    def for_layer(self, layer_idx: int) -> CachePolicy:
        policy = copy.copy(self)
        object.__setattr__(policy, "_layer_retrieval", self.retrieval[layer_idx])
        return policy

    def layer_retrieval(self, device: torch.device) -> torch.Tensor:
        """(Hk,) True for this layer's retrieval heads (a policy from :meth:`for_layer`)."""
        heads = getattr(self, "_layer_retrieval", None)
        if heads is None:
            raise LonglabError(f"{self.name}: a cache layer must hold the policy of its own layer (for_layer)")
        return heads.to(device)


def sinks_and_recent(
    positions: torch.Tensor, valid: torch.Tensor, sinks: int, recent: int | torch.Tensor
) -> torch.Tensor:
    """Mask (B, H, N): each row's first ``sinks`` valid entries by position and the ``recent`` (an int
    or (B,) per batch row) most recent of the others — StreamingLLM's kept set."""
    b = valid.shape[0]
    order = positions.double()
    first = keep_top(-order, valid, torch.full((b,), sinks, device=valid.device))
    total = torch.as_tensor(recent, device=valid.device).expand(b) + sinks
    return keep_top(protect(order, first), valid, total)


def head_aware_keep(
    positions: torch.Tensor, valid: torch.Tensor, retrieval: torch.Tensor, sinks: int, recent: int | torch.Tensor
) -> torch.Tensor:
    """Mask (B, Hk, N) of what a head-aware policy keeps: every valid entry of a retrieval head
    (``retrieval`` (Hk,) bool), sinks + recent of the others."""
    return (valid & retrieval[None, :, None]) | sinks_and_recent(positions, valid, sinks, recent)


def ceil_count(fraction: float, total: int) -> int:
    """ceil(fraction * total) without float noise lifting an exact product (0.5 * 24 = 12, not 13)."""
    return min(total, math.ceil(round(fraction * total, 9)))
