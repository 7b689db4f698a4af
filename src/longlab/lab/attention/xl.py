"""``xl``: Transformer-XL's segment-level recurrence: each segment also attends to a stop-gradient
memory of the preceding tokens' keys/values of the same layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longlab.lab.attention.base import AttentionModule, LabAttention
from longlab.lab.attention.recurrence import segment_attention
from longlab.lab.positions.base import ModelShape
from longlab.lab.registry import register
from longlab.method import check_range


@register
@dataclass(frozen=True)
class XL(LabAttention):
    """Transformer-XL segment recurrence (Dai et al., 2019, "Transformer-XL: Attentive Language Models
    Beyond a Fixed-Length Context", §3.2, h~_{tau+1}^{n-1} = [SG(m_tau^{n-1}) o h_{tau+1}^{n-1}]): the
    queries of a segment of ``segment`` tokens attend causally to their segment and to the keys/values
    of the ``memory`` preceding tokens, computed from the previous segments' hidden states of the layer
    below and stop-gradient. Span and state per layer: at most ``memory + segment`` keys/values.

    Whole-sequence form = the recurrence: in the recurrent model, the memory a layer reads for segment
    tau + 1 holds the lower layer's hidden states of the preceding ``memory`` tokens, which were computed
    when their own segment was processed, with their own memory. Computing every segment of the
    sequence in one pass gives each token exactly those hidden states (by induction over segments and
    layers, each depends only on its segment and its memory window), so the keys/values of the
    preceding tokens in the same layer ARE the memory; detaching them reproduces SG. A lab sequence
    starts with an empty memory, as a stream does.

    Positions: the position component's (RoPE rotates q and k by absolute position, so q.k depends on
    the offset only, which is what XL's own relative encoding (§3.3) ensures); XL's relative encoding
    is not used. SG applies to the hidden states, as in XL: inside the lab model the memory keys/values
    are projected from the detached layer input (``remembered``), so W_k and W_v still learn through
    them; called alone on (q, k, v), the module detaches k and v themselves. Defaults: segment 32 (a
    quarter of the lab's training length), memory 32 (= segment, as mem_len = tgt_len in XL's base configurations)."""

    name = "xl"
    segment: int = 32
    memory: int = 32

    def __post_init__(self) -> None:
        check_range(self.name, "segment", self.segment, low=1, integer=True)
        check_range(self.name, "memory", self.memory, low=0, integer=True)

    def build(self, shape: ModelShape, layer: int) -> AttentionModule:
        return XLAttention(self.segment, self.memory)


class XLAttention(AttentionModule):
    remembers_detached = True

    def __init__(self, segment: int, memory: int):
        super().__init__()
        self.segment, self.memory = segment, memory

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        remembered: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        return segment_attention(q, k, v, self.segment, self.memory, remembered)
