"""Base classes for position methods (kind ``position``) and attention scalings (kind ``scaling``)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from longlab.method import Method
from longlab.positions.rope import FrequencyTable, RopeConfig
from longlab.positions.segments import Segment


@dataclasses.dataclass(frozen=True)
class PositionMethod(Method):
    """How a query-key pair learns its distance: a frequency table plus a set of segments.

    Subclasses override :meth:`table` (frequency methods) or :meth:`segments` (remap methods).
    ``original_length`` is L_train, the context the model was trained at; ``None`` means "read it
    from the model config" (``max_position_embeddings``).
    """

    kind: ClassVar[str] = "position"

    def table(self, rope: RopeConfig, seq_len: int) -> FrequencyTable:
        """Frequencies for a forward pass whose largest query position is ``seq_len - 1``.

        The default is the model's own table: remap methods move positions, not frequencies.
        """
        return FrequencyTable(rope.native_inv_freq, rope.native_attention_factor)

    def segments(self) -> tuple[Segment, ...]:
        return (Segment(),)

    def reach(self) -> int | None:
        """The longest input the method is designed for (None: no designed limit)."""
        return None


@dataclasses.dataclass(frozen=True)
class ScalingMethod(Method):
    """A per-query multiplier on q (composes with any position method)."""

    kind: ClassVar[str] = "scaling"

    def query_scale(self, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
