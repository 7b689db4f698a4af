"""``randomized``: RoPE at randomly sampled, ordered positions during training."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longlab.lab.positions.base import LabPosition, ModelShape, PositionModule
from longlab.lab.positions.rope import RopeModule
from longlab.lab.registry import register
from longlab.method import check_range
from longlab.positions.rope import FrequencyTable, base_inv_freq

EXTRAPOLATION = 16  # the lab evaluates up to 16x the training length


@register
@dataclass(frozen=True)
class Randomized(LabPosition):
    """Randomized positional encodings (Ruoss et al., 2023, "Randomized Positional Encodings Boost
    Length Generalization of Transformers", §3): each training sequence of length L takes the sorted
    positions of L distinct integers drawn uniformly from [0, max_position), so positions up to
    max_position are seen in training; evaluation uses 0..T-1. Here over RoPE (the paper pairs it
    with several encodings). ``max_position`` defaults to 16x the training length (longlab's choice:
    the lab's longest input); ``max_position`` = L gives plain RoPE."""

    name = "randomized"
    max_position: int | None = None
    base: float = 10000.0

    def __post_init__(self) -> None:
        check_range(self.name, "max_position", self.max_position, low=1, integer=True)
        check_range(self.name, "base", self.base, low=1.0, low_open=True)

    def build(self, shape: ModelShape) -> PositionModule:
        table = FrequencyTable(base_inv_freq(shape.head_dim, self.base))
        return RandomizedModule(table, self.max_position or EXTRAPOLATION * shape.train_length)


class RandomizedModule(RopeModule):
    def __init__(self, table: FrequencyTable, max_position: int):
        super().__init__(table)
        self.max_position = max_position

    def positions(self, length: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        if generator is None:  # evaluation: the plain positions
            return torch.arange(length, device=device)
        if length > self.max_position:
            raise ValueError(f"randomized: a training length of {length} exceeds max_position={self.max_position}")
        # drawn on the generator's device (the host), so a seed gives the same positions everywhere
        drawn = torch.randperm(self.max_position, generator=generator, device=generator.device)[:length]
        return drawn.sort().values.to(device)
