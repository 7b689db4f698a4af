"""The lab's own registry: components of models trained from scratch, kept apart from ``longlab.method``.

``longlab.method.REGISTRY`` holds methods that patch a *finished* model (``longlab.apply``); lab
components (an absolute embedding, an ALiBi bias, ...) only make sense while a model is built and
trained, so listing them beside ``yarn`` in ``longlab methods`` would invite ``apply(model, "alibi")``,
which cannot work. They share the method machinery instead: each component is a frozen
:class:`~longlab.method.Method` dataclass validated with :func:`~longlab.method.check_range`, and
specs parse (:func:`longlab.lab.components.component`) with the same grammar and value conversion
as ``longlab.spec`` (``alibi:scale=0.5``).
"""

from __future__ import annotations

from typing import TypeVar

from longlab.method import Method

LAB_KINDS = ("lab-position", "lab-attention")

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
