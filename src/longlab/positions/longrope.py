"""``longrope``: per-dimension rescale factors, a short set within L and a long set beyond."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from longlab.errors import SpecError
from longlab.method import MAX_ATTENTION_FACTOR, MAX_SCALE, check_original_length, check_range, register
from longlab.positions.base import PositionMethod
from longlab.positions.rope import FrequencyTable, RopeConfig
from longlab.positions.yarn import yarn_ramp


@register
@dataclass(frozen=True)
class LongRoPE(PositionMethod):
    """LongRoPE (Ding et al., 2024, "LongRoPE: Extending LLM Context Window Beyond 2 Million Tokens",
    eq. 3): inv_i = 1 / (lambda_i * b^(2i/d)), with ``short_factor`` for n <= L and ``long_factor``
    beyond; cos and sin are scaled by sqrt(1 + ln s / ln L).

    The searched factors are model-specific: pass them as lists, or ``factors=PATH`` to a JSON file
    with ``short_factor`` and ``long_factor`` (the layout of Phi-3's ``rope_scaling``). Without them
    the long set is the YaRN-shaped curve LongRoPE's search starts from (1 for fast dimensions, s for
    slow ones) and the short set is all ones.
    """

    name = "longrope"
    factor: float
    original_length: int | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    factors: str | None = None
    attention_factor: float | None = None

    def __post_init__(self) -> None:
        check_range(self.name, "factor", self.factor, low=0, low_open=True, high=MAX_SCALE)
        check_original_length(self, low=2)  # the attention factor divides by ln L
        check_range(self.name, "attention_factor", self.attention_factor, low=0, low_open=True,
                    high=MAX_ATTENTION_FACTOR)  # fmt: skip
        for param in ("short_factor", "long_factor"):
            for value in getattr(self, param) or ():
                check_range(self.name, param, value, low=1 / MAX_SCALE, high=MAX_SCALE)
        if self.factors is not None and not Path(self.factors).is_file():
            raise SpecError(f"{self.name}: parameter 'factors' must be a JSON file, got {self.factors!r}")

    def resolve(self, rope: RopeConfig) -> LongRoPE:
        resolved = super().resolve(rope)
        short, long = resolved.short_factor, resolved.long_factor
        if resolved.factors is not None:
            data = json.loads(Path(resolved.factors).read_text())
            short, long = tuple(data["short_factor"]), tuple(data["long_factor"])
        half = rope.head_dim // 2
        if long is None:
            ramp = yarn_ramp(rope, resolved.original_length, 32.0, 1.0)
            long = tuple((1 / (ramp / resolved.factor + (1 - ramp))).tolist())
        short = short or (1.0,) * half
        for param, values in (("short_factor", short), ("long_factor", long)):
            if len(values) != half:
                raise SpecError(f"{self.name}: '{param}' needs head_dim/2 = {half} values, got {len(values)}")
        return LongRoPE(resolved.factor, resolved.original_length, short, long, None, resolved.attention_factor)

    def table(self, rope: RopeConfig, seq_len: int) -> FrequencyTable:
        factors = self.long_factor if seq_len > self.original_length else self.short_factor
        exponents = torch.arange(0, rope.head_dim, 2, dtype=torch.int64).float() / rope.head_dim
        inv = 1.0 / (torch.tensor(factors, dtype=torch.float32) * rope.base**exponents)
        attention = self.attention_factor
        if attention is None:
            attention = (
                math.sqrt(1 + math.log(self.factor) / math.log(self.original_length)) if self.factor > 1 else 1.0
            )
        return FrequencyTable(inv, attention)

    def reach(self) -> int:
        return int(self.factor * self.original_length)
