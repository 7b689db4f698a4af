"""``pyramidkv``: SnapKV scores with budgets shrinking from the lowest layer to the highest."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longlab.cache.policies.snapkv import SnapKV
from longlab.cache.policy import ScoreContext
from longlab.method import check_range, register


@register
@dataclass(frozen=True)
class PyramidKV(SnapKV):
    """PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
    Information Funneling", section 3.2): lower layers attend broadly, upper layers to few tokens,
    so layer l of m keeps k_l = k_0 - l (k_0 - k_{m-1}) / (m - 1) with k_{m-1} = k / beta and
    k_0 = 2k - k_{m-1}: an arithmetic sequence whose mean is the per-layer budget k (the paper's
    eq. 5, with k the average budget). Scoring and window as SnapKV. Query-aware."""

    name = "pyramidkv"
    beta: float = 20.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self.name, "beta", self.beta, low=1)

    def target(self, ctx: ScoreContext) -> torch.Tensor:
        average = super().target(ctx).double()
        if ctx.n_layers == 1:
            return average.long()
        top = average / self.beta
        bottom = 2 * average - top
        budget = bottom - ctx.layer_idx * (bottom - top) / (ctx.n_layers - 1)
        return torch.minimum(torch.round(budget).long(), ctx.layer.valid_seen)
