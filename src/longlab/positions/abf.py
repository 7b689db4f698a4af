"""``abf``: adjusted base frequency (a larger RoPE base), the long-context recipe of Llama 2 Long."""

from __future__ import annotations

from dataclasses import dataclass

from longlab.method import check_range, register
from longlab.positions.base import PositionMethod
from longlab.positions.rope import FrequencyTable, RopeConfig, base_inv_freq


@register
@dataclass(frozen=True)
class ABF(PositionMethod):
    """Adjusted base frequency (Xiong et al., 2023, "Effective Long-Context Scaling of Foundation
    Models", section 4.1): RoPE with the base b replaced by ``base`` (Llama 2 Long: 10,000 ->
    500,000), i.e. inv_freq_i = base^(-2i/d); meant to be followed by fine-tuning at the new length.
    ``abf`` at the model's own base is the model's RoPE.
    """

    name = "abf"
    base: float

    def __post_init__(self) -> None:
        # a base <= 1 turns every frequency into 1 or more: no longer a rotary position code
        check_range(self.name, "base", self.base, low=1, low_open=True, high=1e30)

    def table(self, rope: RopeConfig, seq_len: int) -> FrequencyTable:
        return FrequencyTable(base_inv_freq(rope.head_dim, self.base))
