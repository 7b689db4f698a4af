"""Parsing a lab component spec (``"kerple_log"``, ``"alibi:scale=0"``) into its dataclass."""

from __future__ import annotations

import longlab.lab.attention
import longlab.lab.positions  # noqa: F401  (registers every position component)
from longlab.errors import SpecError
from longlab.lab.attention.base import LabAttention
from longlab.lab.attention.full import Full
from longlab.lab.positions.base import LabPosition, ModelShape, PositionModule
from longlab.lab.positions.nope import NoPE
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


def model_spec(spec: str) -> tuple[LabPosition, LabAttention]:
    """A model's components from ``position+attention`` (``"rope+sliding:window=32"``); either may be
    left out (position ``nope``, attention ``full``), at most one of each kind."""
    found: dict[str, Method] = {}
    for part in spec.split("+"):
        made = component(part)
        if made.kind in found:
            raise SpecError(f"{spec!r} names two {made.kind} components ({found[made.kind].name}, {made.name})")
        found[made.kind] = made
    position, attention = found.get("lab-position", NoPE()), found.get("lab-attention", Full())
    probe = _probe(position)
    if not attention.takes_bias and probe.has_bias:
        raise SpecError(f"{attention.name} attention cannot add {position.name}'s position bias; use full attention")
    if not isinstance(attention, Full) and probe.has_attention:
        raise SpecError(
            f"{position.name} computes its own attention (full softmax); it cannot run under {attention.name}"
        )
    return position, attention


def spec_name(position: LabPosition, attention: LabAttention) -> str:
    """The normalised name of a model: the position alone under full attention."""
    return str(position) if isinstance(attention, Full) else f"{position}+{attention}"


def _probe(position: LabPosition) -> PositionModule:
    """A tiny module of ``position``, to read which hooks it uses."""
    return position.build(ModelShape(d_model=8, heads=2, head_dim=4, train_length=8))
