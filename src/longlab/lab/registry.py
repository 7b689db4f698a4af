"""The lab's own registry: components of models trained from scratch, kept apart from ``longlab.method``.

``longlab.method.REGISTRY`` holds methods that patch a *finished* model (``longlab.apply``); lab
components (an absolute embedding, an ALiBi bias, ...) only make sense while a model is built and
trained, so listing them beside ``yarn`` in ``longlab methods`` would invite ``apply(model, "alibi")``,
which cannot work. They share the method machinery instead: each component is a frozen
:class:`~longlab.method.Method` dataclass validated with :func:`~longlab.method.check_range`, and
specs parse with the same grammar and value conversion as ``longlab.spec`` (``alibi:scale=0.5``).
"""

from __future__ import annotations

from typing import TypeVar

from longlab.errors import SpecError
from longlab.method import Method, check_finite, field_types
from longlab.spec import closest, convert, split_part

LAB_KINDS = ("lab-position",)

COMPONENTS: dict[str, type[Method]] = {}

C = TypeVar("C", bound="type[Method]")


def register(cls: C) -> C:
    """Class decorator: add a lab component under ``cls.name``."""
    if cls.kind not in LAB_KINDS:
        raise TypeError(f"{cls.__name__}.kind must be one of {LAB_KINDS}, got {cls.kind!r}")
    if cls.name in COMPONENTS:
        raise TypeError(f"lab component {cls.name!r} is registered twice")
    COMPONENTS[cls.name] = cls
    return cls


def component(spec: str | Method) -> Method:
    """Parse one component spec (``"kerple_log"``, ``"alibi:scale=0"``) into its validated dataclass."""
    if isinstance(spec, Method):
        return spec
    _load_all()
    name, raw = split_part(spec)
    if name not in COMPONENTS:
        raise SpecError(f"unknown lab component {name!r}{closest(name, list(COMPONENTS))} Known: {', '.join(COMPONENTS)}")
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


def _load_all() -> None:
    import longlab.lab.positions  # noqa: F401  (registers every position component)
