"""``full``: keep every token (the reference every policy is compared with)."""

from __future__ import annotations

from dataclasses import dataclass

from longlab.cache.policy import CachePolicy
from longlab.method import register


@register
@dataclass(frozen=True)
class Full(CachePolicy):
    """The uncompressed cache: every token, unrotated, with its position (docs/design.md). Equals no
    cache policy; with ``chunk`` it still prefills in chunks (exact, since nothing is evicted)."""

    name = "full"

    def __post_init__(self) -> None:
        self.check_chunk()
