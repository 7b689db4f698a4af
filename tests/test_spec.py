"""The spec language: parsing, round trips, composition, and the errors bad input gets."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import longlab
from longlab.method import REGISTRY
from longlab.spec import field_types, format_spec, parse


def test_parse_composes_one_method_per_kind():
    position, scaling = parse("yarn:factor=4+logn")
    assert (position.name, position.factor, scaling.name) == ("yarn", 4.0, "logn")
    assert parse("selfextend:group=8,window=2k")[0].window == 2048
    assert parse("yarn", factor=4) == parse("yarn:factor=4")
    assert parse("longrope:factor=2,long_factor=[1;1.5;2]")[0].long_factor == (1.0, 1.5, 2.0)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("yran", r"unknown method 'yran'; did you mean 'yarn'"),
        ("selfextnd:group=4", r"did you mean 'selfextend'"),
        ("yarn:facter=4", r"no parameter 'facter'; did you mean 'factor'"),
        ("yarn", r"needs parameter\(s\) factor"),
        ("yarn:factor=0", r"'factor' must be a number > 0 and <= 1048576, got 0"),
        ("linear:factor=-2", r"'factor' must be a number > 0"),
        ("rerope:window=0", r"'window' must be an integer >= 1 and <= 2147483647, got 0"),
        ("rerope:window=1.5", r"'window' must be an integer .*, got '1.5'"),
        ("selfextend:group=0", r"'group' must be an integer >= 1 and <= 2147483647, got 0"),
        ("leaky_rerope:k=0.5", r"'k' must be a number >= 1"),
        ("ntk:factor=abc", r"'factor' must be a number, got 'abc'"),
        ("yarn:factor=4,factor=2", r"'factor' is given twice"),
        ("yarn:factor", r"expected key=value"),
        ("yarn:factor=4+rerope", r"two position methods \('yarn' and 'rerope'\)"),
        ("logn+logn", r"two scaling methods"),
        ("", r"empty method spec"),
        ("+logn", r"empty method name"),
    ],
)
def test_bad_specs_name_what_is_wrong(spec, message):
    with pytest.raises(longlab.SpecError, match=message):
        parse(spec)


def test_keyword_parameters_must_match_one_method():
    with pytest.raises(longlab.SpecError, match="keyword 'original_length' matches 2"):
        parse("yarn:factor=2+logn", original_length=100)
    with pytest.raises(longlab.SpecError, match="no parameter 'windw'"):
        parse("rerope", windw=3)


def _value_strategy(annotation):
    text = str(annotation)
    if "tuple" in text:
        return st.none() | st.lists(st.floats(0.5, 8, allow_nan=False), min_size=1, max_size=4).map(tuple)
    if "bool" in text:
        return st.booleans()
    if "int" in text:
        return st.integers(-5, 5000) | st.none()
    if "float" in text:
        return st.floats(-2, 100, allow_nan=False) | st.none()
    return st.none()


@st.composite
def _method(draw):
    name = draw(st.sampled_from(sorted(REGISTRY)))
    cls = REGISTRY[name]
    params = {}
    for field, annotation in field_types(cls).items():
        required = next(f for f in dataclasses.fields(cls) if f.name == field).default is dataclasses.MISSING
        if name == "longrope" and field == "factors":
            continue  # a file path; checked elsewhere
        if required:
            params[field] = draw(_value_strategy(annotation).filter(lambda v: v is not None))
        elif draw(st.booleans()):
            params[field] = draw(_value_strategy(annotation))
    return name, params


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(_method())
def test_valid_methods_round_trip_and_invalid_ones_raise_spec_errors(drawn):
    name, params = drawn
    params = {k: v for k, v in params.items() if v is not None}
    try:
        method = REGISTRY[name](**params)
    except longlab.SpecError as error:
        # the message names the parameter at fault (given, or missing such as a cache policy's budget)
        assert any(f"'{key}'" in str(error) for key in field_types(REGISTRY[name])), error
        return
    (parsed,) = parse(format_spec([method]))
    assert parsed == method
    assert str(parsed) == str(method)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("yarnlogrepw:=,+.0123456789k[;]- _")), max_size=40))
def test_any_text_parses_or_raises_spec_error(text):
    try:
        methods = parse(text)
    except longlab.SpecError:
        return
    assert methods and len({m.kind for m in methods}) == len(methods)


@settings(max_examples=100, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=0))
def test_nonpositive_factors_always_rejected(factor):
    for name in ("linear", "ntk", "yarn"):
        with pytest.raises(longlab.SpecError, match="'factor'"):
            parse(f"{name}:factor={factor!r}")


def test_infinite_and_nan_values_are_rejected():
    with pytest.raises(longlab.SpecError, match="'factor'"):
        parse("yarn:factor=nan")
    with pytest.raises(longlab.SpecError, match="'window' must be an integer"):
        parse("rerope:window=inf")
    with pytest.raises(longlab.SpecError, match="'factor' must be a number > 0"):
        parse("linear", factor=-math.inf)
