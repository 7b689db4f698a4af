"""The base of every cache policy (method kind ``cache``) and of the eviction policies.

A cache policy decides what a layer's KV cache holds. After each forward call of an attention layer
(a whole prompt, a prefill chunk, one decoding step) the layer asks its policy to :meth:`compress`
it; eviction policies score every held entry, keep the best ``target`` per (batch row, KV head) and
free the rest (docs/cache.md: savings are real, never masks).

Budgets (docs/cache.md): ``budget=N`` keeps N entries per head; ``ratio=r`` is the compression ratio,
the fraction of tokens removed, so ceil((1 - r) * n) of the n tokens seen stay. During decoding the
target is re-applied after every step, so the cache never grows past it. While decoding, an
eviction frees 1/128 of the target more than it must (``DECODE_SLACK``), so the scoring runs once
every ~target/128 steps instead of after every token: the cache then holds between 127/128 of its
target and the target. (Each decoding-time eviction is decided by one query's attention; 1/32 was
measured to cost accuracy — e.g. AdaKV niah_single_1 at ratio 0.5 fell from 90 to 60 % — 1/128
keeps the evictions small.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from longlab.cache.entries import Entries
from longlab.cache.scores import attention_mass
from longlab.errors import SpecError
from longlab.method import Method, check_range
from longlab.positions.rope import FrequencyTable
from longlab.positions.segments import Segment

if TYPE_CHECKING:
    from longlab.cache.layer import LonglabLayer

DECODE_SLACK = 1 / 128


@dataclass(frozen=True)
class Scoring:
    """What the model tells a layer so that its policy can score entries as attention would see them."""

    segments: tuple[Segment, ...]
    table: Callable[[int], FrequencyTable]  # the position method's table at a sequence length
    scale: float
    layer_idx: int
    n_layers: int


@dataclass
class ScoreContext:
    """What a policy may look at when it scores one layer's entries after a forward call."""

    layer: LonglabLayer
    q: torch.Tensor  # (B, Hq, Tq, d) the call's unrotated queries
    q_pos: torch.Tensor  # (B, Tq)
    q_valid: torch.Tensor  # (B, Tq) False for padding
    segments: tuple[Segment, ...]
    table: FrequencyTable
    scale: float
    layer_idx: int
    n_layers: int

    @property
    def keys(self) -> torch.Tensor:
        return self.layer.entries.dense("keys")

    @property
    def positions(self) -> torch.Tensor:
        return self.layer.entries.dense("positions").long()

    @property
    def valid(self) -> torch.Tensor:
        return self.layer.entries.dense("positions") >= 0

    def mass(self, q: torch.Tensor, q_pos: torch.Tensor, q_valid: torch.Tensor) -> torch.Tensor:
        """Attention probability each held entry receives from queries q (B, Hq, T, d), summed over
        the queries and averaged over the query heads sharing its KV head: (B, Hk, N)."""
        b, hq, t, d = q.shape
        hk = self.layer.entries.heads
        grouped = q.view(b, hk, hq // hk, t, d)
        per_head_pos = q_pos[:, None].expand(b, hk, t)
        total = attention_mass(grouped, self.keys, per_head_pos, self.positions, self.valid, self.segments,
                               self.table, self.scale, q_valid=q_valid)  # fmt: skip
        return total.mean(dim=2)


@dataclass(frozen=True)
class Reads:
    """What attention reads of a layer's entries for one call: keys, values (B, H, M, d), positions and
    validity (B, H, M) -- H the KV heads, or the query heads for a policy that reads per query head --
    and the bytes read — the entries and any metadata used to choose them."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    nbytes: int


@dataclass(frozen=True)
class CachePolicy(Method):
    """A cache policy. ``chunk`` > 0 prefills prompts in chunks of that many tokens, compressing after
    each, so peak memory is bounded by the budget plus one chunk rather than the whole prompt."""

    kind = "cache"
    chunk: int | None = None
    query_aware: ClassVar[bool] = False

    def check_chunk(self) -> None:
        check_range(self.name, "chunk", self.chunk, low=1, integer=True)

    def for_layer(self, layer_idx: int) -> CachePolicy:
        """The policy a cache layer holds: itself, or a copy with what is specific to layer
        ``layer_idx`` (head-aware policies: that layer's retrieval heads)."""
        return self

    def reweight(self, ctx: ScoreContext, out: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                 key_valid: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """The attention output (B, Hq, Tq, d) after attending over the held entries at the positions
        of :meth:`attention_positions`; a policy whose entries stand for several tokens
        (RazorAttention's compensation token) corrects it here. Unchanged by default."""
        return out

    def new_fields(self, fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Extra per-entry fields for new tokens (H2O's accumulated attention); none by default."""
        return {}

    def new_store(self, fields: dict[str, torch.Tensor]) -> Entries:
        """The storage of a layer's entries, created from its first tokens (B, H, T, ...)."""
        return Entries.from_dense(fields)

    def attention_positions(
        self, q_pos: torch.Tensor, k_pos: torch.Tensor, key_valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The positions attention rotates at: q_pos (B, Tq), k_pos (B, Hk, N) -> the same shapes (or
        the queries per KV head, (B, Hk, Tq)). The tokens' own positions by default; StreamingLLM
        uses cache slots."""
        return q_pos, k_pos

    def reads(self, ctx: ScoreContext, keys, values, k_pos, key_valid) -> Reads:
        """What attention reads for this call, given the held entries (B, Hk, N, ...): all of them by
        default; Quest reads only the pages a decoding query selects; retrieval adds, per query head,
        the far keys it retrieves (then the head axis is the query heads)."""
        return Reads(keys, values, k_pos, key_valid, ctx.layer.nbytes)

    def compress(self, ctx: ScoreContext) -> None:
        """Evict from ``ctx.layer`` after a forward call; the default keeps everything."""


@dataclass(frozen=True)
class EvictionPolicy(CachePolicy):
    """Keeps the ``target`` highest-scoring entries per head; subclasses define :meth:`scores`."""

    budget: int | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        if (self.budget is None) == (self.ratio is None):
            raise SpecError(
                f"{self.name}: give exactly one of 'budget' (tokens kept per head, e.g. budget=1024) "
                f"or 'ratio' (fraction of tokens removed, e.g. ratio=0.5); got budget={self.budget}, ratio={self.ratio}"
            )
        check_range(self.name, "budget", self.budget, low=1, integer=True)
        check_range(self.name, "ratio", self.ratio, low=0, high=1, low_open=False)
        if self.ratio == 1:
            raise SpecError(f"{self.name}: parameter 'ratio' must be < 1 (it is the fraction removed), got 1")
        self.check_chunk()

    def target(self, ctx: ScoreContext) -> torch.Tensor:
        """Entries to keep per head, for each batch row: (B,)."""
        seen = ctx.layer.valid_seen
        if self.budget is not None:
            return torch.clamp(seen, max=self.budget)
        return torch.ceil((1 - self.ratio) * seen.double()).long()

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        """(B, Hk, N) — higher is kept; +inf protects an entry."""
        raise NotImplementedError

    def select(self, ctx: ScoreContext, scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return keep_top(scores, ctx.valid, target)

    def over_budget(self, held: torch.Tensor, target: torch.Tensor) -> bool:
        """Whether entries held per (batch row, head) exceed the target (B,)."""
        return bool((held > target[:, None]).any())

    def compress(self, ctx: ScoreContext) -> None:
        target = self.target(ctx)
        if not self.over_budget(ctx.layer.entries.counts(), target) and bool(ctx.valid.all()):
            return
        if ctx.q.shape[2] == 1:  # a decoding step: make room for the next few steps too
            target = target - torch.floor(target * DECODE_SLACK).long()
        ctx.layer.entries.keep(self.select(ctx, self.scores(ctx), target))


def keep_top(scores: torch.Tensor, valid: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mask (B, H, N) of the ``target[b]`` best valid entries of each row; ties go to the earlier entry."""
    scores = scores.masked_fill(~valid, -math.inf)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order)
    )
    return (rank < target.view(-1, 1, 1)) & valid


def recent(positions: torch.Tensor, valid: torch.Tensor, count: int | torch.Tensor) -> torch.Tensor:
    """Mask (B, H, N) of each row's ``count`` most recent valid entries."""
    return keep_top(
        positions.double(), valid, torch.as_tensor(count, device=positions.device).expand(positions.shape[0])
    )


def protect(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return scores.masked_fill(mask, math.inf)
