"""``kv_int8`` / ``kv_int4``: quantized caches with a full-precision residual window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from longlab.cache.policy import CachePolicy
from longlab.cache.quantized import QuantizedEntries
from longlab.method import check_range, register


@dataclass(frozen=True)
class QuantizedCache(CachePolicy):
    """KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache",
    section 3.2, algorithm 1): keys quantized per channel over blocks of ``residual`` tokens, values
    per token in groups of ``group`` channels, the newest < ``residual`` tokens in full precision.
    Every element's error is at most half its quantization step. Nothing is evicted. Query-agnostic."""

    bits: ClassVar[int] = 8
    residual: int = 128
    group: int = 32

    def __post_init__(self) -> None:
        check_range(self.name, "residual", self.residual, low=1, integer=True)
        check_range(self.name, "group", self.group, low=1, integer=True)
        self.check_chunk()

    def new_store(self, fields: dict[str, torch.Tensor]) -> QuantizedEntries:
        return QuantizedEntries(fields, self.bits, self.residual, self.group)


@register
@dataclass(frozen=True)
class KVInt8(QuantizedCache):
    __doc__ = QuantizedCache.__doc__.replace("quantized per channel", "quantized to 8 bits per channel")
    name = "kv_int8"
    bits = 8


@register
@dataclass(frozen=True)
class KVInt4(QuantizedCache):
    __doc__ = QuantizedCache.__doc__.replace("quantized per channel", "quantized to 4 bits (two per byte) per channel")
    name = "kv_int4"
    bits = 4
