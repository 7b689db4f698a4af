"""The bridge to transformers: ``apply`` / ``reset`` / ``describe`` patch a loaded model so that
longlab computes its attention, and chunked prefill feeds long prompts to its cache."""

from longlab.bridge import heads  # noqa: F401  (registers apply's preparation of head-aware policies)
from longlab.bridge.load import load
from longlab.bridge.patch import (
    SUPPORTED_FAMILIES,
    active_methods,
    apply,
    cache_stats,
    describe,
    is_applied,
    patch_of,
    reset,
)

__all__ = [
    "SUPPORTED_FAMILIES",
    "active_methods",
    "apply",
    "cache_stats",
    "describe",
    "is_applied",
    "load",
    "patch_of",
    "reset",
]
