"""``dca``: Dual Chunk Attention, chunk-local positions for intra-, successive- and inter-chunk keys."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from longlab.method import check_order, check_original_length, check_range, register
from longlab.positions.base import PositionMethod
from longlab.positions.rope import RopeConfig
from longlab.positions.segments import Constant, Modulo, Segment


@register
@dataclass(frozen=True)
class DualChunk(PositionMethod):
    """Dual Chunk Attention (An et al., 2024, "Training-Free Long-Context Scaling of Large Language
    Models", section 3.2): positions are cut into chunks of size s and every key sits at its in-chunk
    position P_k[j] = j mod s. The query's position depends on how many chunks the key lags behind it:

    - intra-chunk (same chunk):       P_q[i] = i mod s, so the distance is the true i - j;
    - successive-chunk (lag 1):       P_q[i] = min(s + (i mod s), s + w): true distances for the first
                                      w queries of a chunk (the local window), capped at s + w after;
    - inter-chunk (lag >= 2):         P_q[i] = s + w.

    The three parts are one softmax over all keys, merged by log-sum-exp. No distance exceeds s + w,
    whatever the input length. Positions follow the official implementation (HKUNLP/ChunkLlama,
    ``chunkllama_attn_replace.py``, whose ``chunk_size`` is s + w and ``chunk_len`` is s).
    Defaults from that code: s + w = 3L/4 and w = L/16, so s = 3L/4 - L/16. A chunk at least as long
    as the input is plain RoPE.
    """

    name = "dca"
    chunk_size: int | None = None
    local_window: int | None = None
    original_length: int | None = None

    def __post_init__(self) -> None:
        check_range(self.name, "chunk_size", self.chunk_size, low=1, integer=True)
        check_range(self.name, "local_window", self.local_window, low=0, integer=True)
        check_order(self.name, "local_window", self.local_window, "chunk_size", self.chunk_size, strict=True)
        check_original_length(self)

    def resolve(self, rope: RopeConfig) -> DualChunk:
        resolved = super().resolve(rope)
        length = resolved.original_length
        window = resolved.local_window if resolved.local_window is not None else length // 16
        chunk = resolved.chunk_size if resolved.chunk_size is not None else max(window + 1, length * 3 // 4 - window)
        return replace(resolved, chunk_size=chunk, local_window=window)

    def segments(self) -> tuple[Segment, ...]:
        s, w = self.chunk_size, self.local_window
        key = Modulo(s)
        intra = Segment(query_map=Modulo(s), key_map=key, chunk=s, min_chunk_lag=0, max_chunk_lag=1)
        successive = Segment(query_map=Modulo(s, s, s + w), key_map=key, chunk=s, min_chunk_lag=1, max_chunk_lag=2)
        inter = Segment(query_map=Constant(s + w), key_map=key, chunk=s, min_chunk_lag=2, max_chunk_lag=math.inf)
        return (intra, successive, inter)
