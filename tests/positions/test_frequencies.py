"""Frequency tables against their papers' formulas (docs/design.md), written out independently here.

linear, dynamic_ntk, yarn, llama3 and longrope are also checked end to end against transformers in
test_transformers_equivalence.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from longlab import parse
from longlab.positions.rope import RopeConfig, base_inv_freq

D, BASE, L = 64, 10000.0, 512
ROPE = RopeConfig(D, BASE, L, base_inv_freq(D, BASE))
INDEX = torch.arange(D // 2, dtype=torch.float64)
INV = BASE ** (-2 * INDEX / D)


def _table(spec: str, seq_len: int = L):
    method = parse(spec)[0].resolve(ROPE)
    return method.table(ROPE, seq_len)


def _close(table, expected, factor=1.0):
    torch.testing.assert_close(table.inv_freq.double(), expected, rtol=2e-6, atol=0)
    assert table.attention_factor == pytest.approx(factor)


def test_none_is_the_native_table():
    _close(_table("none"), INV)


def test_linear_divides_by_factor():
    _close(_table("linear:factor=4"), INV / 4)


def test_ntk_raises_the_base():
    _close(_table("ntk:factor=4"), (BASE * 4 ** (D / (D - 2))) ** (-2 * INDEX / D))


@pytest.mark.parametrize("n", [100, L, 3 * L])
def test_dynamic_ntk_follows_the_length(n):
    s = 2.0
    base = BASE * (s * max(n, L) / L - (s - 1)) ** (D / (D - 2))
    _close(_table("dynamic_ntk:factor=2", n), base ** (-2 * INDEX / D))


def _yarn(s, beta_fast=32.0, beta_slow=1.0):
    def dim(r):
        return D * math.log(L / (2 * math.pi * r)) / (2 * math.log(BASE))

    low, high = max(math.floor(dim(beta_fast)), 0), min(math.ceil(dim(beta_slow)), D - 1)
    ramp = ((INDEX - low) / (high - low)).clamp(0, 1)
    return INV / s * ramp + INV * (1 - ramp), 0.1 * math.log(s) + 1


def test_yarn_ramps_between_interpolation_and_extrapolation():
    expected, factor = _yarn(8.0)
    _close(_table("yarn:factor=8"), expected, factor)
    table = _table("yarn:factor=8")
    assert table.inv_freq[0] == pytest.approx(INV[0].item())  # fastest dimension kept
    assert table.inv_freq[-1] == pytest.approx(INV[-1].item() / 8)  # slowest interpolated


@pytest.mark.parametrize("n", [L // 2, 3 * L])
def test_dynamic_yarn_uses_length_ratio(n):
    s = max(1.0, n / L)
    expected, factor = _yarn(s) if s > 1 else (INV, 1.0)
    _close(_table("dynamic_yarn", n), expected, factor)


def test_llama3_keeps_high_divides_low_blends_middle():
    s, low, high = 8.0, 1.0, 4.0
    wavelength = 2 * math.pi / INV
    t = (L / wavelength - low) / (high - low)
    expected = torch.where(
        wavelength < L / high, INV, torch.where(wavelength > L / low, INV / s, (1 - t) * INV / s + t * INV)
    )
    _close(_table("llama3"), expected)


def test_longrope_short_and_long_sets_and_attention_factor():
    short = [1.0 + 0.01 * i for i in range(D // 2)]
    long = [1.0 + 0.2 * i for i in range(D // 2)]
    method = parse("longrope", factor=4, short_factor=short, long_factor=long)[0].resolve(ROPE)
    factor = math.sqrt(1 + math.log(4) / math.log(L))
    _close(method.table(ROPE, L), 1 / (torch.tensor(short, dtype=torch.float64) * BASE ** (2 * INDEX / D)), factor)
    _close(method.table(ROPE, L + 1), 1 / (torch.tensor(long, dtype=torch.float64) * BASE ** (2 * INDEX / D)), factor)


def test_longrope_default_long_factors_follow_the_yarn_shape():
    expected, _ = _yarn(4.0)
    _close(_table("longrope:factor=4", 2 * L), expected, math.sqrt(1 + math.log(4) / math.log(L)))


def test_longrope_reads_factors_file(tmp_path):
    path = tmp_path / "factors.json"
    path.write_text(json.dumps({"short_factor": [1.0] * (D // 2), "long_factor": [2.0] * (D // 2)}))
    _close(_table(f"longrope:factor=2,factors={path}", 2 * L), INV / 2, math.sqrt(1 + math.log(2) / math.log(L)))


def test_power_scaling():
    _close(_table("power:power=0.5"), INV * (1 - 2 * INDEX / D) ** 0.5)
    _close(_table("power:power=0"), INV)


def test_truncation_keeps_high_sets_middle_zeroes_low():
    a, b, rho = 1e-3, 2e-2, 5e-4
    expected = torch.where(b <= INV, INV, torch.where(a < INV, torch.full_like(INV, rho), torch.zeros_like(INV)))
    _close(_table(f"truncation:low={a},high={b},rho={rho}"), expected)
    defaults = parse("truncation")[0].resolve(ROPE)
    assert defaults.high == pytest.approx(2 * math.pi / L) and defaults.low == pytest.approx(defaults.high / 8)
