"""``nope``: no position encoding; causal attention alone orders the tokens."""

from __future__ import annotations

from dataclasses import dataclass

from longlab.lab.positions.base import LabPosition, ModelShape, PositionModule
from longlab.lab.registry import register


@register
@dataclass(frozen=True)
class NoPE(LabPosition):
    """NoPE (Kazemnejad et al., 2023, "The Impact of Positional Encoding on Length Generalization in
    Transformers", §3, Theorem 1): a causal decoder without any position encoding can represent both
    absolute and relative positions; the paper finds it generalises to longer inputs better than
    absolute encodings."""

    name = "nope"

    def build(self, shape: ModelShape) -> PositionModule:
        return PositionModule()
