"""``learned``: a trained table of absolute position embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from longlab.errors import LonglabError
from longlab.lab.positions.base import LabPosition, ModelShape, PositionModule
from longlab.lab.registry import register
from longlab.method import check_range

EXTRAPOLATION = 16  # the lab evaluates up to 16x the training length


@register
@dataclass(frozen=True)
class Learned(LabPosition):
    """Learned absolute position embeddings (Gehring et al., 2017, "Convolutional Sequence to Sequence
    Learning", §3.1; as in GPT-2): row p of a table is added to the token at position p. Rows past the
    training length are never trained, which is why they fail to extrapolate (Press et al., 2022, §2).
    ``max_positions`` defaults to 16x the training length (longlab's choice: the lab's longest input).
    """

    name = "learned"
    max_positions: int | None = None

    def __post_init__(self) -> None:
        check_range(self.name, "max_positions", self.max_positions, low=1, integer=True)

    def build(self, shape: ModelShape) -> PositionModule:
        return LearnedModule(self.max_positions or EXTRAPOLATION * shape.train_length, shape.d_model)


class LearnedModule(PositionModule):
    def __init__(self, max_positions: int, d_model: int):
        super().__init__()
        self.table = nn.Embedding(max_positions, d_model)
        nn.init.normal_(self.table.weight, std=0.02)

    def absolute(self, positions: torch.Tensor) -> torch.Tensor:
        if int(positions.max()) >= self.table.num_embeddings:
            raise LonglabError(
                f"learned: position {int(positions.max())} is past the table of {self.table.num_embeddings} rows; "
                "build with a larger max_positions"
            )
        return self.table(positions)
