"""Position methods: how a query-key pair learns its distance (docs/design.md).

Importing this package registers every method under its spec name.
"""

from longlab.positions import (  # noqa: F401  (imported to register the methods)
    abf,
    dca,
    giraffe,
    interpolation,
    llama3,
    lm_infinite,
    logn,
    longrope,
    none,
    ntk,
    rerope,
    selfextend,
    sliding,
    string_rope,
    yarn,
)
from longlab.positions.base import PositionMethod, ScalingMethod
from longlab.positions.rope import FrequencyTable, RopeConfig

__all__ = ["FrequencyTable", "PositionMethod", "RopeConfig", "ScalingMethod"]
