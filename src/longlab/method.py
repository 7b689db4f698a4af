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

KINDS = ("position", "scaling", "cache", "prefill", "context")

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


# The bounds every numeric parameter lives within, whatever its own range says.
MAX_INT = 2**31 - 1  # positions are int32 in the cache: no count, length or window beyond that
MAX_SCALE = 2.0**20  # the largest scale factor (about a million times the training length): every
#   frequency table it gives stays finite in float32
MAX_ATTENTION_FACTOR = 10.0  # a multiplier on cos and sin: logits grow by its square


def _fail(method: str, param: str, allowed: str, value: Any) -> SpecError:
    return SpecError(f"{method}: parameter '{param}' must be {allowed}, got {value!r}")


def _bound(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


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
    """Raise a SpecError naming ``param``, its value and its allowed range unless ``value`` lies in it.

    Every value must be finite (``inf`` or ``nan`` never make a method work: they surface later as
    NaN logits or an OverflowError); integers are at most ``MAX_INT`` (positions are int32), and an
    integer field refuses a float, even a whole one. ``None`` passes: it means "derive from the
    model" and is checked again after ``resolve``.
    """
    if value is None:
        return
    if integer:
        high = min(high, MAX_INT)
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
        raise _fail(method, param, kind, value)
    bounds = []
    if low != -math.inf:
        bounds.append(f"> {_bound(low)}" if low_open else f">= {_bound(low)}")
    if high != math.inf:
        bounds.append(f"<= {_bound(high)}")
    # integers always have a finite bound (MAX_INT); a float without an upper one says it must be finite
    noun = kind if integer or high != math.inf else "a finite number"
    allowed = " ".join((noun, " and ".join(bounds))).strip()
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail(method, param, allowed, value)
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        raise _fail(method, param, allowed, value)


def check_finite(method: Method) -> None:
    """Every number among ``method``'s parameters (lists included) is finite: the guard behind the
    methods' own ranges, for the spec parser."""
    for param, value in method.parameters().items():
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, float) and not math.isfinite(item):
                raise _fail(method.name, param, "a finite number", item)


def check_order(
    method: str, low_name: str, low: float | None, high_name: str, high: float | None, strict: bool
) -> None:
    """Raise a SpecError naming both parameters unless low < high (or <= when not strict)."""
    if low is None or high is None:
        return
    if low > high or (strict and low == high):
        relation = "<" if strict else "<="
        raise SpecError(f"{method}: parameter '{low_name}' must be {relation} '{high_name}', got {low!r} and {high!r}")


def check_original_length(method: Method, low: int = 1) -> None:
    """L_train: a whole number of tokens (>= 2 where a method divides by log L)."""
    check_range(method.name, "original_length", method.original_length, low=low, integer=True)
