"""Parameters are validated up front: non-finite, absurd, overflowing or fractional values fail in
the spec parser or the method's own check with a SpecError naming the method, the parameter, the
value and what is allowed — never later as NaN logits or an OverflowError."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import longlab
from longlab.cache.policy import EvictionPolicy
from longlab.method import REGISTRY
from longlab.positions import RopeConfig
from longlab.spec import field_types, parse

MAX_INT = 2**31 - 1  # longlab.method.MAX_INT: positions are int32
MAX_SCALE = 2.0**20  # longlab.method.MAX_SCALE


@pytest.mark.parametrize(
    "spec,message",
    [
        ("yarn:factor=inf", r"yarn: parameter 'factor' must be a number > 0 and <= 1048576, got inf"),
        ("yarn:factor=1e400", r"yarn: parameter 'factor' must be a number > 0 and <= 1048576, got inf"),
        ("yarn:factor=nan", r"yarn: parameter 'factor' must be a number > 0 and <= 1048576, got nan"),
        ("ntk:factor=1e300", r"ntk: parameter 'factor' must be a number > 0 and <= 1048576, got 1e\+300"),
        ("linear:factor=-inf", r"linear: parameter 'factor' must be a number > 0 .*, got -inf"),
        ("dynamic_ntk:factor=0", r"dynamic_ntk: parameter 'factor' must be a number > 0 .*, got 0.0"),
        ("llama3:factor=-8", r"llama3: parameter 'factor' must be a number > 0 .*, got -8.0"),
        ("llama3:high_freq_factor=inf", r"llama3: parameter 'high_freq_factor' must be a number > 0 .*, got inf"),
        ("yarn:factor=4,beta_fast=inf", r"yarn: parameter 'beta_fast' must be a number > 0 .*, got inf"),
        ("yarn:factor=4,attention_factor=1e30", r"yarn: parameter 'attention_factor' must be a number > 0 and <= 10"),
        ("longrope:factor=2,long_factor=[1;inf]", r"longrope: parameter 'long_factor' must be a number .*, got inf"),
        ("longrope:factor=4,original_length=1", r"longrope: parameter 'original_length' must be an integer >= 2"),
        ("leaky_rerope:k=inf", r"leaky_rerope: parameter 'k' must be a number >= 1 and <= 1048576, got inf"),
        ("power:power=inf", r"power: parameter 'power' must be a finite number >= 0, got inf"),
        ("truncation:rho=1e300", r"truncation: parameter 'rho' must be a number >= 0 and <= 3.14159, got 1e\+300"),
        ("truncation:low=nan", r"truncation: parameter 'low' must be a finite number >= 0, got nan"),
        (
            "logn:original_length=1",
            r"logn: parameter 'original_length' must be an integer >= 2 and <= 2147483647, got 1",
        ),
        ("logn:original_length=0", r"logn: parameter 'original_length' must be an integer >= 2"),
        ("selfextend:group=infk", r"selfextend: parameter 'group' must be an integer \(a k suffix .*\), got 'infk'"),
        ("selfextend:group=2.5k", r"selfextend: parameter 'group' must be an integer \(a k suffix .*\), got '2.5k'"),
        ("selfextend:window=1.5", r"selfextend: parameter 'window' must be an integer .*, got '1.5'"),
        ("selfextend:group=-4", r"selfextend: parameter 'group' must be an integer >= 1 and <= 2147483647, got -4"),
        (
            "rerope:window=2147483648",
            r"rerope: parameter 'window' must be an integer >= 1 and <= 2147483647, got 2147483648",
        ),
        (
            "sliding:size=4194304k",
            r"sliding: parameter 'size' must be an integer >= 1 and <= 2147483647, got 4294967296",
        ),
        ("lm_infinite:band=" + "9" * 40, r"lm_infinite: parameter 'band' must be an integer >= 1 and <= 2147483647"),
        ("snapkv:budget=1e3", r"snapkv: parameter 'budget' must be an integer \(a k suffix .*\), got '1e3'"),
        ("snapkv:budget=99999999999", r"snapkv: parameter 'budget' must be an integer >= 1 and <= 2147483647"),
        ("h2o:budget=8,recent=nan", r"h2o: parameter 'recent' must be a number >= 0 and <= 1, got nan"),
        ("pyramidkv:budget=8,beta=inf", r"pyramidkv: parameter 'beta' must be a finite number >= 1, got inf"),
        ("random:budget=8,seed=-1", r"random: parameter 'seed' must be an integer >= 0 and <= 2147483647, got -1"),
        ("kv_int4:residual=0", r"kv_int4: parameter 'residual' must be an integer >= 1 and <= 2147483647, got 0"),
        ("streaming:window=3000000000", r"streaming: parameter 'window' must be an integer >= 1 and <= 2147483647"),
        ("full:chunk=0.5k", r"full: parameter 'chunk' must be an integer \(a k suffix .*\), got '0.5k'"),
    ],
)
def test_bad_values_are_refused_up_front(spec, message):
    with pytest.raises(longlab.SpecError, match=message):
        parse(spec)


def test_k_suffix_takes_whole_numbers():
    assert parse("selfextend:group=2k,window=32k")[0].window == 32 * 1024
    assert parse("snapkv:budget=1k")[0].budget == 1024


def _numeric_fields():
    for name, cls in sorted(REGISTRY.items()):
        for field, annotation in field_types(cls).items():
            text = str(annotation)
            if "int" in text or "float" in text:
                yield pytest.param(name, field, "int" in text and "float" not in text, id=f"{name}.{field}")


def _required(name: str, field: str) -> dict:
    """Values for the parameters ``name`` needs besides ``field`` (an eviction policy one budget)."""
    cls = REGISTRY[name]
    needed = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
    params = {key: 4.0 for key in needed}
    if issubclass(cls, EvictionPolicy) and field not in ("budget", "ratio"):
        params["budget"] = 8
    return {k: v for k, v in params.items() if k != field}


@pytest.mark.parametrize("name,field,integer", list(_numeric_fields()))
def test_every_numeric_parameter_refuses_non_finite_and_overflowing_values(name, field, integer):
    """Constructed directly or parsed, every number of every method: inf, -inf, nan, 1e400 and (for
    integers) 2**31 and a fraction fail with a SpecError naming the method, the parameter and the value."""
    base = _required(name, field)
    tuple_field = "tuple" in str(field_types(REGISTRY[name])[field])
    for value in (math.inf, -math.inf, math.nan):
        given = (1.0, value) if tuple_field else value
        with pytest.raises(longlab.SpecError, match=rf"{name}: parameter '{field}' .*got {value}"):
            REGISTRY[name](**base, **{field: given})
        text = f"[1;{value}]" if tuple_field else str(value)
        spec = ",".join([f"{k}={v}" for k, v in base.items()] + [f"{field}={text}"])
        with pytest.raises(longlab.SpecError, match=rf"{name}: parameter '{field}'"):
            parse(f"{name}:{spec}")
    if integer:
        with pytest.raises(longlab.SpecError, match=rf"{name}: parameter '{field}' .*<= {MAX_INT}, got {MAX_INT + 1}"):
            REGISTRY[name](**base, **{field: MAX_INT + 1})
        with pytest.raises(longlab.SpecError, match=rf"{name}: parameter '{field}' must be an integer, got 2.5"):
            REGISTRY[name](**base, **{field: 2.5})


def _rope(original_length=64):
    inv = 1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16)
    return RopeConfig(head_dim=16, base=10000.0, original_length=original_length, native_inv_freq=inv)


@pytest.mark.parametrize(
    "spec",
    [
        f"linear:factor={MAX_SCALE}",
        f"ntk:factor={MAX_SCALE}",
        f"dynamic_ntk:factor={MAX_SCALE}",
        f"yarn:factor={MAX_SCALE},attention_factor=10,beta_fast={MAX_SCALE}",
        f"llama3:factor={MAX_SCALE},low_freq_factor=1,high_freq_factor={MAX_SCALE}",
        f"longrope:factor={MAX_SCALE},long_factor=[{MAX_SCALE};{1 / MAX_SCALE};1;1;1;1;1;1]",
        "truncation:rho=3.14159",
        "leaky_rerope:k=1048576",
        "logn:original_length=2",
        "longrope:factor=4,original_length=2",
    ],
)
def test_the_edges_of_every_allowed_range_give_finite_tables(spec):
    """At the largest values allowed, frequency tables, attention factors and LogN scales stay finite."""
    for method in parse(spec):
        rope = _rope()
        method = method.resolve(rope)
        if method.kind == "scaling":
            assert torch.isfinite(method.query_scale(torch.arange(0, 10**6, 997))).all()
            continue
        for length in (2, 64, 10**6):
            table = method.table(rope, length)
            assert torch.isfinite(table.inv_freq).all() and math.isfinite(table.attention_factor), (spec, length)
        assert method.reach() is None or method.reach() >= 0
