"""Parsing a lab component spec (``"kerple_log"``, ``"alibi:scale=0"``) into its dataclass."""

from __future__ import annotations

import longlab.lab.positions  # noqa: F401  (registers every position component)
from longlab.errors import SpecError
from longlab.lab.registry import COMPONENTS
from longlab.method import Method, check_finite, field_types
from longlab.spec import closest, convert, split_part


def component(spec: str | Method) -> Method:
    """Parse one component spec (``"kerple_log"``, ``"alibi:scale=0"``) into its validated dataclass."""
    if isinstance(spec, Method):
        return spec
    name, raw = split_part(spec)
    if name not in COMPONENTS:
        raise SpecError(
            f"unknown lab component {name!r}{closest(name, list(COMPONENTS))} (known: {', '.join(COMPONENTS)})"
        )
    cls = COMPONENTS[name]
    types_ = field_types(cls)
    values = {}
    for key, text in raw.items():
        if key not in types_:
            raise SpecError(f"lab component {name!r} has no parameter {key!r}; its parameters: {', '.join(types_)}")
        values[key] = convert(name, key, types_[key], text)
    made = cls(**values)
    check_finite(made)
    return made
