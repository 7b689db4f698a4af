"""Perplexity by length."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from longlab.eval.generation import perplexity_sample
from longlab.eval.tasks.base import CellContext, Task, register
from longlab.method import check_range


@register
@dataclass(frozen=True)
class Perplexity(Task):
    """Perplexity of held-out text (the test split of ``longlab corpus``, never trained on) at each
    length: whole-window (every position of a ``length``-token window) and sliding-window (a
    ``2 x length`` span read in windows of ``length`` advancing by ``stride``, each token scored once,
    as in Press et al., 2022), plus the per-position loss curve of the whole window. Sample ``i``'s span
    depends on (seed, length, i) alone, so a resumed run with more samples measures what a fresh one does."""

    name = "ppl"
    kind = "perplexity"
    default_samples = 2
    stride_fraction: float = 0.25

    def __post_init__(self) -> None:
        check_range(self.name, "stride_fraction", self.stride_fraction, low=0, high=1, low_open=True)

    def measure(self, cell: CellContext, todo: list[int]) -> Iterator[tuple[list[int], list[dict]]]:
        tokens = cell.held_out.tokens()
        for i in todo:
            yield [i], [perplexity_sample(cell.model, tokens, cell.length, i, cell.seed, self.stride_fraction)]
