"""How a global sequence is cut into per-rank shards, and put back together.

- ``contiguous``: rank r holds tokens [r L/N, (r+1) L/N). Under causal attention the last rank's
  queries see the whole sequence and the first rank's see one chunk: work grows linearly with rank.
- ``zigzag``: the sequence is cut into 2N chunks and rank r holds chunks r and 2N-1-r (the
  load-balanced layout of ring-flash-attention and Megatron-LM's context parallelism; Brandon et
  al., 2023, "Striped Attention: Faster Ring Attention for Causal Transformers", balance the same
  work by striping tokens instead). Every rank holds one early and one late chunk, and its causal
  work is the same 2N c^2 + c pairs.

Lengths that do not divide. The global sequence is padded at its *end* to a multiple of N (contiguous)
or 2N (zigzag). Padding tokens get the positions that continue the sequence (L, L+1, ...), so under
causal attention no real query sees them (they are in its future), no real token's output changes,
and :meth:`SequenceLayout.gather` drops them. Labels pad with -100 (ignored by the loss). Frequency
tables must still be computed from the real length L (``SequenceLayout.length``), which is what
``ring_attention``/``ulysses_attention``/``shard`` do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from longlab.errors import LonglabError
from longlab.parallel.comm import Group

LAYOUTS = ("zigzag", "contiguous")


def check_layout(kind: str) -> str:
    if kind not in LAYOUTS:
        raise LonglabError(f"unknown sequence layout {kind!r}; choose one of {', '.join(LAYOUTS)}")
    return kind


@dataclass(frozen=True)
class SequenceLayout:
    """A global sequence of ``length`` real tokens split over ``world`` ranks as ``kind``."""

    kind: str
    world: int
    length: int

    def __post_init__(self) -> None:
        check_layout(self.kind)
        if not isinstance(self.world, int) or self.world < 1:
            raise LonglabError(f"world size must be a positive integer, got {self.world!r}")
        if not isinstance(self.length, int) or self.length < 1:
            raise LonglabError(f"sequence length must be a positive integer, got {self.length!r}")

    @property
    def pieces(self) -> int:
        """Number of equal chunks the padded sequence is cut into."""
        return 2 * self.world if self.kind == "zigzag" else self.world

    @property
    def padded_length(self) -> int:
        return -(-self.length // self.pieces) * self.pieces

    @property
    def padding(self) -> int:
        return self.padded_length - self.length

    @property
    def chunk(self) -> int:
        return self.padded_length // self.pieces

    @property
    def local_length(self) -> int:
        return self.padded_length // self.world

    def indices(self, rank: int) -> torch.Tensor:
        """Global indices (= positions) of rank ``rank``'s tokens in the padded sequence, increasing."""
        if not 0 <= rank < self.world:
            raise LonglabError(f"rank {rank} is outside the world of {self.world}")
        c = self.chunk
        # layout metadata lives on the host; callers move it to their tensors' device
        if self.kind == "contiguous":
            return torch.arange(rank * c, (rank + 1) * c, device="cpu")
        late = 2 * self.world - 1 - rank
        first, second = (torch.arange(s * c, (s + 1) * c, device="cpu") for s in (rank, late))
        return torch.cat((first, second))

    def positions(self, rank: int) -> torch.Tensor:
        """(1, local_length) global position ids of the shard (pass as ``position_ids``)."""
        return self.indices(rank)[None]

    def valid(self, rank: int) -> torch.Tensor:
        """(local_length,) True for real tokens, False for end padding."""
        return self.indices(rank) < self.length

    def pad(self, x: torch.Tensor, dim: int = 1, value: Any = 0) -> torch.Tensor:
        if x.shape[dim] != self.length:
            raise LonglabError(
                f"expected {self.length} tokens along dim {dim} for this layout, "
                f"got {x.shape[dim]} (shape {tuple(x.shape)})"
            )
        if not self.padding:
            return x
        shape = list(x.shape)
        shape[dim] = self.padding
        return torch.cat((x, x.new_full(shape, value)), dim=dim)

    def split(self, x: torch.Tensor, rank: int, dim: int = 1, pad_value: Any = 0) -> torch.Tensor:
        """Rank ``rank``'s shard of the global ``x`` (``length`` along ``dim``), padded as the module says."""
        return self.pad(x, dim, pad_value).index_select(dim, self.indices(rank).to(x.device))

    def gather(self, local: torch.Tensor, group: Any = None, dim: int = 1) -> torch.Tensor:
        """The global tensor from every rank's shard (all-gather, reorder, drop padding); not differentiable."""
        comm = Group.resolve(group)
        if comm.world != self.world:
            raise LonglabError(f"layout is for {self.world} ranks but the process group has {comm.world}")
        comm.check_device(local.device)
        parts = comm.all_gather(local.detach(), kind="gather")
        return self.assemble(parts, dim)

    def assemble(self, parts: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
        """The global tensor from the list of shards of ranks 0..N-1 (no communication)."""
        if len(parts) != self.world:
            raise LonglabError(f"expected {self.world} shards, got {len(parts)}")
        stacked = torch.cat(parts, dim=dim)
        order = torch.cat([self.indices(r) for r in range(self.world)]).to(stacked.device)
        full = torch.empty_like(stacked).index_copy_(dim, order, stacked)
        return full.narrow(dim, 0, self.length)


def layout_for_shard(kind: str, world: int, local_length: int, length: int | None) -> SequenceLayout:
    """The layout a shard of ``local_length`` tokens belongs to; ``length`` is the real global length."""
    padded = local_length * world
    layout = SequenceLayout(check_layout(kind), world, padded if length is None else length)
    if layout.padded_length != padded:
        raise LonglabError(
            f"a {kind} shard of {local_length} tokens on {world} ranks holds {padded} padded tokens, but a "
            f"sequence of {layout.length} tokens pads to {layout.padded_length}; split it with "
            f"SequenceLayout({kind!r}, {world}, {layout.length}).split(...)"
        )
    return layout
