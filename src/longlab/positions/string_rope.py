"""``string``: STRING, well-trained small distances shifted over the under-trained large ones."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from longlab.method import MAX_ATTENTION_FACTOR, check_order, check_original_length, check_range, register
from longlab.positions.base import PositionMethod
from longlab.positions.rope import FrequencyTable, RopeConfig
from longlab.positions.segments import Affine, Segment

DEFAULT_SHIFT_RATIO = 0.33  # the official scripts' ``shifted_ratio``
DEFAULT_WINDOW = 128  # the official scripts' ``local_value``


@register
@dataclass(frozen=True)
class String(PositionMethod):
    """STRING, ShifTed Rotary position embeddING (An et al., 2024, "Why Does the Effective Context
    Length of LLMs Fall Short?", section 4, Algorithm 1): the largest relative positions are rarely
    trained, so they are dropped and the frequent small ones are shifted over them. With shift offset
    S and local window W, a pair at distance d = i - j keeps d when d < S and uses d - S + W when
    d >= S (query rotated at i - S + W, key at j), so no distance exceeds max(S, n - S + W) and the
    W nearest distances are never reused for far keys. W <= S; S = W is plain RoPE.

    Defaults from the official code (HKUNLP/STRING): S = int(0.33 L), W = min(128, S).
    ``attention_factor`` multiplies cos and sin like YaRN's (logits scale by its square); the paper
    uses none (1.0), the official transformers demo 0.1 ln 2 + 1. The official FlashAttention
    prefill also admits distance S to the near window (window_size=[S, 0]) while its decoding path
    does not; longlab follows the decoding path and the paper: near means d < S.
    """

    name = "string"
    shift: int | None = None
    window: int | None = None
    attention_factor: float = 1.0
    original_length: int | None = None

    def __post_init__(self) -> None:
        check_range(self.name, "shift", self.shift, low=0, integer=True)
        check_range(self.name, "window", self.window, low=0, integer=True)
        check_order(self.name, "window", self.window, "shift", self.shift, strict=False)
        check_range(self.name, "attention_factor", self.attention_factor, low=0, low_open=True,
                    high=MAX_ATTENTION_FACTOR)  # fmt: skip
        check_original_length(self)

    def resolve(self, rope: RopeConfig) -> String:
        resolved = super().resolve(rope)
        shift = resolved.shift if resolved.shift is not None else int(DEFAULT_SHIFT_RATIO * resolved.original_length)
        window = resolved.window if resolved.window is not None else min(DEFAULT_WINDOW, shift)
        return replace(resolved, shift=shift, window=window)

    def table(self, rope: RopeConfig, seq_len: int) -> FrequencyTable:
        return FrequencyTable(rope.native_inv_freq, rope.native_attention_factor * self.attention_factor)

    def segments(self) -> tuple[Segment, ...]:
        s, w = self.shift, self.window
        if s == w:  # no shift: plain RoPE
            return (Segment(),)
        return (Segment(0, s), Segment(s, math.inf, None, Affine(1, w - s)))

    def reach(self) -> int:
        """L + S - W: the longest input whose shifted distances stay below L (L when S > L: the
        near distances themselves pass L)."""
        length = self.original_length
        return length + self.shift - self.window if self.shift <= length else length
