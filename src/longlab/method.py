"""The base of every longlab method, and the registry that maps names to method classes.

A method is a ``@dataclass`` with typed fields and validation in ``__post_init__``. Its class
attributes ``name`` and ``kind`` place it in the registry; one method of each kind is active at a
time, and ``+`` in a spec string composes methods of different kinds (docs/design.md).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, ClassVar, TypeVar

from longlab.errors import SpecError

KINDS = ("position", "scaling", "cache")

REGISTRY: dict[str, type[Method]] = {}

M = TypeVar("M", bound="type[Method]")


def register(cls: M) -> M:
    """Class decorator: add a method dataclass to the registry under ``cls.name``."""
    if cls.kind not in KINDS:
        raise TypeError(f"{cls.__name__}.kind must be one of {KINDS}, got {cls.kind!r}")
    if cls.name in REGISTRY:
        raise TypeError(f"method name {cls.name!r} is registered twice")
    REGISTRY[cls.name] = cls
    return cls


@dataclasses.dataclass(frozen=True)
class Method:
    """A named, validated, composable method. Subclasses are frozen dataclasses."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""

    def resolve(self, rope: Any) -> Method:
        """Fill defaults that depend on the model (``None`` fields) and return the completed method.

        The base fills ``original_length`` (L_train) from the model when the method has that field.
        """
        if "original_length" in field_types(type(self)) and self.original_length is None:
            return dataclasses.replace(self, original_length=rope.original_length)
        return self

    def parameters(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __str__(self) -> str:
        params = ",".join(f"{k}={_format(v)}" for k, v in self.parameters().items() if v is not None)
        return f"{self.name}:{params}" if params else self.name


def _format(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ";".join(_format(v) for v in value) + "]"
    return str(value)


def field_types(cls: type[Method]) -> dict[str, Any]:
    """The declared type of each parameter of a method class (forward references resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


# -- validation helpers used by the methods' __post_init__ ---------------------------------------


def _fail(method: str, param: str, allowed: str, value: Any) -> SpecError:
    return SpecError(f"{method}: parameter '{param}' must be {allowed}, got {value!r}")


def check_range(
    method: str,
    param: str,
    value: float | None,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    integer: bool = False,
) -> None:
    """Raise a SpecError naming ``param`` and its allowed range unless ``value`` lies in it.

    ``None`` passes: it means "derive from the model" and is checked again after ``resolve``.
    """
    if value is None:
        return
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
        raise _fail(method, param, kind, value)
    if math.isnan(value):
        raise _fail(method, param, kind, value)
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        lower = f"> {low:g}" if low_open else f">= {low:g}"
        allowed = lower if high == math.inf else f"{lower} and <= {high:g}"
        raise _fail(method, param, f"{kind} {allowed}", value)


def check_order(
    method: str, low_name: str, low: float | None, high_name: str, high: float | None, strict: bool
) -> None:
    """Raise a SpecError naming both parameters unless low < high (or <= when not strict)."""
    if low is None or high is None:
        return
    if low > high or (strict and low == high):
        relation = "<" if strict else "<="
        raise SpecError(f"{method}: parameter '{low_name}' must be {relation} '{high_name}', got {low!r} and {high!r}")


def check_original_length(method: Method) -> None:
    check_range(method.name, "original_length", method.original_length, low=1, integer=True)
