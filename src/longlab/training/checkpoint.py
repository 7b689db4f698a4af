"""Save a fine-tuned model as a plain transformers checkpoint whose config carries its position method."""

from __future__ import annotations

import json
from pathlib import Path

from longlab.loading import CARRIED_METHOD_KEY
from longlab.positions.abf import ABF
from longlab.positions.base import PositionMethod
from longlab.positions.interpolation import Linear
from longlab.positions.rope import RopeConfig
from longlab.positions.yarn import YaRN


def native_rope_parameters(method: PositionMethod, rope: RopeConfig) -> dict | None:
    """transformers' own ``rope_parameters`` for ``method`` where it has an equivalent (so the checkpoint
    reads the same without longlab), else None. The formulas are checked equal in
    tests/bridge/test_transformers_equivalence.py."""
    if isinstance(method, Linear) and method.original_length == rope.original_length:
        return {"rope_type": "linear", "factor": float(method.factor), "rope_theta": rope.base}
    if isinstance(method, YaRN) and method.attention_factor is None:
        return {"rope_type": "yarn", "factor": float(method.factor), "rope_theta": rope.base,
                "original_max_position_embeddings": method.original_length,
                "beta_fast": float(method.beta_fast), "beta_slow": float(method.beta_slow)}  # fmt: skip
    if isinstance(method, ABF):  # a base change is plain RoPE with another base
        return {"rope_type": "default", "rope_theta": float(method.base)}
    return None


def write_method(folder: Path, method: PositionMethod, rope: RopeConfig) -> None:
    """Record ``method`` in ``folder``/config.json: the ``longlab_method`` spec (``longlab.apply(model,
    config.longlab_method)`` reproduces the fine-tuned model) and, where transformers has it, its own
    ``rope_parameters``."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config[CARRIED_METHOD_KEY] = str(method)
    native = native_rope_parameters(method, rope)
    if native is not None:
        config["rope_parameters"] = native
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
