"""``none``: the model's own RoPE, unchanged (the baseline every method is compared against)."""

from __future__ import annotations

from dataclasses import dataclass

from longlab.method import register
from longlab.positions.base import PositionMethod


@register
@dataclass(frozen=True)
class NoneMethod(PositionMethod):
    """Plain RoPE as the model was trained (Su et al., 2021, RoFormer eq. 34).

    Uses the model's own frequency table (``rope_parameters``), so logits equal the unpatched model's.
    """

    name = "none"
