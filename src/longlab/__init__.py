"""longlab: the long-context workbench for transformer language models.

import longlab
longlab.apply(model, "yarn:factor=4")   # extend
longlab.describe(model)
longlab.reset(model)
longlab.apply(model, "yarn:factor=4+snapkv:budget=1024")   # extend and compress
longlab.cache_stats(model)
longlab.methods()

The names below are imported on first use (PEP 562), so ``import longlab.attention.kernel`` or a
``longlab`` command that needs no model does not pay for loading transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "SUPPORTED_FAMILIES": "longlab.bridge",
    "active_methods": "longlab.bridge",
    "apply": "longlab.bridge",
    "describe": "longlab.bridge",
    "is_applied": "longlab.bridge",
    "reset": "longlab.bridge",
    "CacheStats": "longlab.cache.stats",
    "cache_stats": "longlab.bridge",
    "LonglabError": "longlab.errors",
    "SpecError": "longlab.errors",
    "UnsupportedModelError": "longlab.errors",
    "load": "longlab.bridge",  # loading.load + the method a fine-tuned checkpoint carries
    "model_path": "longlab.loading",
    "Composition": "longlab.spec",
    "compose": "longlab.spec",
    "format_spec": "longlab.spec",
    "methods": "longlab.spec",
    "parse": "longlab.spec",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'longlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return __all__
