"""The base of sparse prefill methods (kind ``prefill``): estimate a pattern, then attend sparsely.

A prefill method approximates attention for calls with many queries (a prompt, a prefill chunk):
it estimates, from the call's own q and k, which keys each block of queries reads, and hands that
selection to :func:`longlab.prefill.sparse.sparse_attention`. Calls shorter than ``min_length``
queries (decoding included) stay dense and exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from longlab.attention.kernel import segmented_attention
from longlab.method import Method, check_range
from longlab.positions.rope import FrequencyTable
from longlab.positions.segments import Segment
from longlab.prefill.sparse import Selection, sparse_attention


@dataclass(frozen=True)
class PrefillMethod(Method):
    """Sparse attention for calls of at least ``min_length`` queries; dense below (decoding always)."""

    kind = "prefill"
    min_length: int = 1024

    def __post_init__(self) -> None:
        check_range(self.name, "min_length", self.min_length, low=2, integer=True)

    def applies(self, q_len: int) -> bool:
        """True when a call with ``q_len`` queries takes the sparse path (never for one query)."""
        return q_len >= self.min_length

    def full(self, k_len: int) -> bool:
        """True when these settings select every key for ``k_len`` keys (the identity settings)."""
        raise NotImplementedError

    def select(self, q, k, q_pos, k_pos, key_valid, segments, table, scale) -> Selection:
        """The keys each query block reads, estimated from this call's q and k."""
        raise NotImplementedError

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_pos: torch.Tensor,
        k_pos: torch.Tensor,
        segments: Sequence[Segment],
        table: FrequencyTable,
        scale: float,
        key_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of q (B, Hq, Tq, d) over k, v (B, Hk, Tk, d) with this method's sparse pattern
        (arguments as :func:`longlab.attention.kernel.segmented_attention`). At identity settings
        (every key selected) this *is* the dense kernel."""
        b, tq, tk = q.shape[0], q.shape[2], k.shape[2]
        q_pos, k_pos = q_pos.expand(b, tq), k_pos.expand(b, tk)
        if self.full(tk):
            return segmented_attention(q, k, v, q_pos, k_pos, segments, table, scale, key_valid)
        with torch.no_grad():  # the pattern is a decision, not a function to differentiate
            selection = self.select(q, k, q_pos, k_pos, key_valid, segments, table, scale)
        return sparse_attention(q, k, v, q_pos, k_pos, segments, table, scale, selection, key_valid, self.name)
