"""The spec language: ``name:key=value,key=value+name2:...`` (docs/design.md).

The same string works in Python (``longlab.apply(model, "yarn:factor=4+logn")``) and on the command
line. Values are converted to each parameter's declared type; integers accept a ``k`` suffix
(``window=2k`` is 2048); lists are written ``[1.0;1.5;2]``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from typing import Any

import longlab.cache.policies
import longlab.context
import longlab.positions
import longlab.prefill  # noqa: F401  (registers the methods)
from longlab.errors import SpecError
from longlab.method import KINDS, REGISTRY, Method, check_finite, field_types

_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def closest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.5)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def method_class(name: str) -> type[Method]:
    try:
        return REGISTRY[name]
    except KeyError:
        known = sorted(REGISTRY)
        raise SpecError(f"unknown method {name!r}{closest(name, known)} Known methods: {', '.join(known)}") from None


def _options(annotation: Any) -> tuple[Any, ...]:
    """The non-None types a parameter accepts (``float | None`` -> (float,))."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    return tuple(t for t in options if t is not type(None))


def convert(method: str, param: str, annotation: Any, text: str) -> Any:
    """``text`` as the parameter's declared type. Integers take a ``k`` suffix on a whole number
    (``2k`` is 2048; ``2.5k`` and ``infk`` are refused). Ranges, finiteness included (``inf``,
    ``nan``, ``1e400``), are checked by the method itself (``__post_init__`` through
    :func:`longlab.method.check_range`, whose message names the allowed range) and, for any number
    a method leaves unchecked, by :func:`build`."""
    target = _options(annotation)[0]
    lowered = text.strip().lower()
    try:
        if lowered in {"none", "null"} and type(None) in typing.get_args(annotation):
            return None
        if target is bool:
            if lowered in _TRUE | _FALSE:
                return lowered in _TRUE
            raise ValueError
        if target is int:
            return int(lowered[:-1]) * 1024 if lowered.endswith("k") else int(lowered)
        if target is float:
            return float(lowered)
        if typing.get_origin(target) is tuple:
            items = [item for item in text.strip().strip("[]").split(";") if item.strip()]
            return tuple(float(item) for item in items)
        return text.strip()
    except ValueError:
        kind = {
            bool: "true or false",
            int: "an integer (a k suffix multiplies a whole number by 1024: 2k = 2048)",
            float: "a number",
        }.get(target, "a list like [1;2]")
        raise SpecError(f"{method}: parameter '{param}' must be {kind}, got {text!r}") from None


def build(name: str, params: dict[str, Any]) -> Method:
    """Instantiate method ``name`` with ``params`` (strings are converted to the declared types)."""
    cls = method_class(name)
    types_ = field_types(cls)
    values = {}
    for key, value in params.items():
        if key not in types_:
            allowed = ", ".join(types_) or "none"
            raise SpecError(
                f"method {name!r} has no parameter {key!r}{closest(key, list(types_))} Its parameters: {allowed}"
            )
        if isinstance(value, str):
            value = convert(name, key, types_[key], value)
        elif isinstance(value, int) and not isinstance(value, bool) and float in _options(types_[key]):
            value = float(value)
        elif isinstance(value, list):
            value = tuple(value)
        values[key] = value
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values and _required(f)]
    if missing:
        raise SpecError(f"method {name!r} needs parameter(s) {', '.join(missing)} (e.g. '{name}:{missing[0]}=4')")
    method = cls(**values)
    check_finite(method)
    return method


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def split_part(part: str) -> tuple[str, dict[str, str]]:
    name, _, rest = part.partition(":")
    name = name.strip()
    if not name:
        raise SpecError(f"empty method name in spec part {part!r}; write e.g. 'yarn:factor=4'")
    params: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))) if rest.strip() else ():
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise SpecError(f"{name}: expected key=value, got {item!r}")
        if key.strip() in params:
            raise SpecError(f"{name}: parameter {key.strip()!r} is given twice")
        params[key.strip()] = value
    return name, params


def parse(spec: str | Method | Sequence[Method], **overrides: Any) -> list[Method]:
    """Parse a spec into methods, at most one per kind.

    Keyword ``overrides`` set parameters (``parse("yarn", factor=4)``); each must belong to exactly one
    of the methods named in the spec.
    """
    if isinstance(spec, Method):
        methods = [spec]
    elif isinstance(spec, str):
        if not spec.strip():
            raise SpecError("empty method spec; write e.g. 'none', 'yarn:factor=4' or 'yarn:factor=4+logn'")
        parts = [split_part(p) for p in spec.split("+")]
        for key, value in overrides.items():
            owners = [params for name, params in parts if len(parts) == 1 or key in field_types(method_class(name))]
            if len(owners) != 1:
                names = [name for name, _ in parts]
                raise SpecError(f"keyword {key!r} matches {len(owners)} of the methods {names}; set it in the spec")
            owners[0][key] = value
        methods = [build(name, params) for name, params in parts]
        overrides = {}
    else:
        methods = list(spec)
    if overrides:
        raise SpecError("keyword parameters need a spec string; pass the method object already configured")
    seen: dict[str, str] = {}
    for method in methods:
        if method.kind in seen:
            raise SpecError(
                f"two {method.kind} methods ({seen[method.kind]!r} and {method.name!r}); "
                f"compose at most one method of each kind ({', '.join(KINDS)}) with '+'"
            )
        seen[method.kind] = method.name
    return methods


def format_spec(methods: Sequence[Method]) -> str:
    """The spec string that parses back to ``methods``."""
    return "+".join(str(m) for m in methods)


@dataclasses.dataclass(frozen=True)
class Composition:
    """One parsed spec — at most one method per kind, as written — passed along instead of the string,
    so it is parsed once and each kind is picked in one place."""

    methods: tuple[Method, ...]

    def of_kind(self, kind: str) -> Method | None:
        return next((m for m in self.methods if m.kind == kind), None)

    @property
    def position(self) -> Method:
        """The position method; ``none`` (the model's own RoPE) when the spec names none."""
        return self.of_kind("position") or build("none", {})

    @property
    def scaling(self) -> Method | None:
        return self.of_kind("scaling")

    @property
    def cache(self) -> Method | None:
        return self.of_kind("cache")

    @property
    def prefill(self) -> Method | None:
        """The sparse prefill method (attention over long prompts approximated), if any."""
        return self.of_kind("prefill")

    @property
    def context(self) -> Method | None:
        """The context-processing method (the input is changed, not the model), if any."""
        return self.of_kind("context")

    def resolve(self, rope: Any) -> Composition:
        """Every method with its model-derived defaults filled (``Method.resolve``)."""
        return Composition(tuple(m.resolve(rope) for m in self.methods))

    def __str__(self) -> str:
        return format_spec(self.methods)


def compose(spec: str | Method | Sequence[Method] | Composition, **overrides: Any) -> Composition:
    """:func:`parse` into a :class:`Composition` (a composition passes through unchanged)."""
    if isinstance(spec, Composition) and not overrides:
        return spec
    return Composition(tuple(parse(spec.methods if isinstance(spec, Composition) else spec, **overrides)))


def methods() -> list[dict[str, Any]]:
    """Every registered method: name, kind, parameters (type and default) and its paper line."""
    table = []
    for name, cls in sorted(REGISTRY.items(), key=lambda item: (KINDS.index(item[1].kind), item[0])):
        params = {}
        for f in dataclasses.fields(cls):
            # only position and scaling methods take defaults from the model
            unset = "from model" if cls.kind in ("position", "scaling") else "unset"
            default = "required" if _required(f) else (unset if f.default is None else f.default)
            params[f.name] = {"type": _type_name(field_types(cls)[f.name]), "default": default}
        summary = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        table.append({"name": name, "kind": cls.kind, "parameters": params, "summary": summary})
    return table


def _type_name(annotation: Any) -> str:
    annotation = _options(annotation)[0]
    if typing.get_origin(annotation) is tuple:
        return "list[float]"
    return getattr(annotation, "__name__", str(annotation))
