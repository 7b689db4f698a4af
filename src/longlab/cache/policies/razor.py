"""``razor``: RazorAttention — retrieval heads keep everything, the others sinks + a buffer + one
compensation token standing for every token they dropped."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longlab.cache.heads import HeadAwarePolicy, ceil_count, head_aware_keep
from longlab.cache.policy import ScoreContext
from longlab.cache.scores import attention_blocks
from longlab.errors import SpecError
from longlab.method import check_range, register
from longlab.positions.rope import rotate


@register
@dataclass(frozen=True)
class Razor(HeadAwarePolicy):
    """RazorAttention (Tang et al., 2024, "RazorAttention: Efficient KV Cache Compression Through
    Retrieval Heads", arXiv 2407.15891). Retrieval heads (section 3.3) are found on a sequence of
    random tokens repeated (``longlab.bridge.heads``): the ``echo`` fraction of KV heads that attend most
    to the earlier copy of the current token (echo heads) and the ``induction`` fraction that attend
    most to the token that followed it (induction heads) keep their whole cache. Every other head keeps
    the first ``sinks`` tokens and a buffer of the L_h = max(``buffer``, ceil(N / ``compression``))
    most recent ones, N the tokens it has seen (algorithm 1), and folds every token it drops into one
    *compensation token* (section 3.4, eq. 4): key and value the mean of the dropped keys and values.
    Attention counts it n times, n the tokens it stands for (eq. 5):

        softmax weight of the compensation token = n·exp(q·k̂) / (Σ_kept exp(q·k_i) + n·exp(q·k̂))

    Keys are cached before RoPE, so k̂ is the mean of the dropped keys *rotated at their positions*
    (as in the paper's post-RoPE cache), stored un-rotated at the last dropped position (exact for RoPE
    and its frequency scalings; with a position remap such as SelfExtend its far segment sees k̂ at that
    position). A compensation token that later leaves the buffer's reach is merged again, weighted by n.
    ``echo=1`` or ``induction=1`` (every head retrieval) equals ``full``. Query-agnostic."""

    name = "razor"
    procedure = "echo_induction"
    echo: float = 0.01
    induction: float = 0.14
    sinks: int = 4
    buffer: int = 256
    compression: float = 5.0
    probe: int = 256
    seed: int = 0
    scores: str | None = None

    def __post_init__(self) -> None:
        self.check_fraction("echo", self.echo)
        self.check_fraction("induction", self.induction)
        check_range(self.name, "sinks", self.sinks, low=0, integer=True)
        check_range(self.name, "buffer", self.buffer, low=1, integer=True)
        check_range(self.name, "compression", self.compression, low=1)
        check_range(self.name, "probe", self.probe, low=8, integer=True)
        check_range(self.name, "seed", self.seed, low=0, integer=True)
        if self.probe % 2:
            raise SpecError(f"{self.name}: parameter 'probe' must be even (two copies of a sequence), got {self.probe}")
        self.check_chunk()

    def streaming_count(self, heads: int) -> int:  # not used: two rankings (from_scores)
        raise NotImplementedError

    def from_scores(self, scores: torch.Tensor) -> HeadAwarePolicy:
        """``scores`` (2, layers, KV heads): echo and induction scores; the top ``echo`` and top
        ``induction`` fractions (rounded up) are retrieval heads."""
        retrieval = torch.zeros(scores.shape[1:], dtype=torch.bool)
        for fraction, score in zip((self.echo, self.induction), scores, strict=True):
            top = torch.sort(score.flatten().double(), descending=True, stable=True).indices
            retrieval.view(-1)[top[: ceil_count(fraction, score.numel())]] = True
        return self.with_retrieval(retrieval)

    def new_fields(self, fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each entry's count of tokens it stands for: 1, n for a compensation token."""
        return {"count": torch.ones(fields["positions"].shape, dtype=torch.float32, device=fields["positions"].device)}

    def held_budget(self, seen: torch.Tensor) -> torch.Tensor:
        """L_h per batch row (B,) from the tokens seen (algorithm 1, step 2)."""
        by_ratio = torch.ceil(seen.double() / self.compression).long()
        return torch.clamp(by_ratio, min=self.buffer)

    def compress(self, ctx: ScoreContext) -> None:
        entries = ctx.layer.entries
        valid, positions = ctx.valid, ctx.positions
        keep = head_aware_keep(positions, valid, self.layer_retrieval(valid.device), self.sinks,
                               self.held_budget(ctx.layer.valid_seen))  # fmt: skip
        dropped = valid & ~keep
        if not bool(dropped.any()):
            if not bool(valid.all()):
                entries.keep(keep)
            return
        count = entries.dense("count")
        weight = count * dropped
        total = weight.sum(dim=-1, keepdim=True)  # (B, Hk, 1) tokens the compensation stands for
        keys, values = entries.dense("keys"), entries.dense("values")
        # eq. 4 on the post-RoPE keys: rotate each at its position, average (weighted by the tokens each
        # entry already stands for), rotate back from the compensation token's position
        exact = torch.promote_types(keys.dtype, torch.float32)  # sums of many entries: at least float32
        rotated = _rotate_entries(keys.to(exact), positions, ctx.table)
        mean_key = (rotated * weight[..., None]).sum(dim=2, keepdim=True) / total.clamp(min=1)[..., None]
        mean_value = (values.to(exact) * weight[..., None]).sum(dim=2, keepdim=True) / total.clamp(min=1)[..., None]
        last = torch.where(dropped, positions, -1).amax(dim=-1, keepdim=True)  # (B, Hk, 1)
        slot = dropped & (positions == last)  # the compensation token takes the last dropped entry's slot
        mean_key = _rotate_entries(mean_key, last, ctx.table, inverse=True)
        entries.set("keys", torch.where(slot[..., None], mean_key.to(keys.dtype), keys))
        entries.set("values", torch.where(slot[..., None], mean_value.to(values.dtype), values))
        entries.set("count", torch.where(slot, total.float(), count))
        entries.keep(keep | slot)

    def reweight(self, ctx, out, q_pos, k_pos, key_valid):
        """Eq. 5: attention gave each compensation token weight p as one token; counting it n times
        turns the output o into (o + (n - 1) p v̂) / (1 + (n - 1) p)."""
        if not isinstance(ctx.layer.entries.fields.get("count"), torch.Tensor):
            return out
        count = ctx.layer.entries.dense("count")
        extra = (count - 1).clamp(min=0) * key_valid  # (B, Hk, N), non-zero only at compensation tokens
        if not bool((extra > 0).any()):
            return out
        b, hq, t, d = out.shape
        hk = count.shape[1]
        q_heads = q_pos if q_pos.dim() == 3 else q_pos[:, None].expand(b, hk, t)
        values = ctx.layer.entries.dense("values").float()
        corrected = out.float().view(b, hk, hq // hk, t, d).clone()
        for start, stop, p in attention_blocks(ctx.q.reshape(b, hk, hq // hk, t, d), ctx.keys, q_heads, k_pos,
                                               key_valid, ctx.segments, ctx.table, ctx.scale):  # fmt: skip
            # one compensation token per head: the (n - 1)-weighted sums pick it out
            pn = torch.einsum("bhgqk,bhk->bhgq", p, extra)
            pnv = torch.einsum("bhgqk,bhk,bhkd->bhgqd", p, extra, values)
            block = corrected[:, :, :, start:stop]
            corrected[:, :, :, start:stop] = (block + pnv) / (1 + pn[..., None])
        return corrected.view(b, hq, t, d).to(out.dtype)


def _rotate_entries(x: torch.Tensor, positions: torch.Tensor, table, inverse: bool = False) -> torch.Tensor:
    """Rotate entries x (B, Hk, N, d) at their positions (B, Hk, N)."""
    b, hk, n, d = x.shape
    flat = rotate(x.reshape(b * hk, 1, n, d), positions.reshape(b * hk, n), table, inverse=inverse)
    return flat.view(b, hk, n, d)
