"""longlab: the long-context workbench for transformer language models.

import longlab
longlab.apply(model, "yarn:factor=4")   # extend
longlab.describe(model)
longlab.reset(model)
longlab.apply(model, "yarn:factor=4+snapkv:budget=1024")   # extend and compress
longlab.cache_stats(model)
longlab.methods()
"""

from longlab.cache.stats import CacheStats, cache_stats
from longlab.errors import LonglabError, SpecError, UnsupportedModelError
from longlab.models.bridge import SUPPORTED_FAMILIES, active_methods, apply, describe, is_applied, reset
from longlab.models.bundled import load, model_path
from longlab.spec import format_spec, methods, parse

__version__ = "0.1.0"

__all__ = [
    "SUPPORTED_FAMILIES",
    "CacheStats",
    "LonglabError",
    "SpecError",
    "UnsupportedModelError",
    "__version__",
    "active_methods",
    "apply",
    "cache_stats",
    "describe",
    "format_spec",
    "is_applied",
    "load",
    "methods",
    "model_path",
    "parse",
    "reset",
]
