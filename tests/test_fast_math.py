"""ops/fast_math.py (the CPU's exp, SiLU and softmax) against float64 numpy and MLX's own ops."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from kimi_mlx.errors import ConfigError
from kimi_mlx.ops import fast_math as F

ULP = 1.19e-7  # float32's relative spacing at 1


def test_exp_is_within_an_ulp_or_two_over_the_normal_range():
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-87.3, 88.3, 400_001), rng.standard_normal(100_000) * 5,
                        [0.0, -0.0, 1e-30, -1e-30, 0.34657, -0.34657]]).astype(np.float32)
    got = np.array(F.exp_poly(mx.array(x))).astype(np.float64)
    want = np.exp(x.astype(np.float64))
    assert (np.abs(got - want) / want).max() <= 2 * ULP


def test_exp_edges_and_the_shift():
    x = mx.array([-np.inf, np.inf, np.nan, -100.0, 100.0, -87.4, 88.4, 0.0])
    got = np.array(F.exp_poly(x))
    assert got[0] == 0 and got[1] == np.inf and np.isnan(got[2]) and got[3] == 0 and got[4] == np.inf
    assert got[5] == 0 and got[6] == np.inf and got[7] == 1
    s, m = mx.array([[1.0, 2.0, 3.0], [-1.0, 0.5, -np.inf]]), mx.array([[3.0], [0.5]])
    want = np.exp(np.array(s, np.float64) - np.array(m, np.float64))
    np.testing.assert_allclose(np.array(F.exp_poly(s, m)), want, rtol=2 * ULP)
    assert F.exp_poly(s.astype(mx.bfloat16), m, mx.bfloat16).dtype == mx.bfloat16


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("fn", ["silu", "sigmoid"])
def test_silu_and_sigmoid_are_within_a_rounding_of_float64(fn, dtype):
    """(MLX's own nn.silu is ~26 ulp off at x ~ -48 on this CPU; these within 2.)"""
    x = (mx.random.normal((64, 1000), key=mx.random.key(1)) * 12).astype(dtype)
    got = {"silu": F._silu, "sigmoid": F._sigmoid}[fn](x)
    assert got.dtype == dtype
    xn = np.array(x.astype(mx.float32)).astype(np.float64)
    want = (xn if fn == "silu" else 1.0) / (1 + np.exp(-xn))
    err = np.abs(np.array(got.astype(mx.float32)) - want) / np.maximum(np.abs(want), 1e-30)
    tol = 2 * ULP if dtype == mx.float32 else 2 ** -8  # bf16: one rounding of the result
    assert err[np.abs(xn) < 80].max() <= tol


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_softmax_matches_mlx_with_masked_keys(dtype):
    s = mx.random.normal((2, 8, 3000), key=mx.random.key(2)) * 30
    s = mx.where(mx.arange(3000) < mx.array([[[1]], [[2999]]]) * 1000, s, -mx.inf).astype(dtype)  # rows 1 and 3 keys
    got, want = F._softmax(s), mx.softmax(s, axis=-1, precise=True)
    assert got.dtype == dtype
    tol = 1e-6 if dtype == mx.float32 else 2 ** -8
    assert float(mx.abs(got.astype(mx.float32) - want.astype(mx.float32)).max()) <= tol
    assert float(mx.abs(got.astype(mx.float32).sum(-1) - 1).max()) <= 100 * tol


def test_the_switch(monkeypatch):
    x = mx.random.normal((5, 300), key=mx.random.key(3)) * 10
    assert F.active() == (mx.default_device() == mx.cpu)
    monkeypatch.setenv(F.ENV, "off")
    assert not F.active() and mx.array_equal(F.silu(x), nn.silu(x)) and mx.array_equal(F.sigmoid(x), mx.sigmoid(x))
    assert mx.array_equal(F.softmax(x), mx.softmax(x, axis=-1, precise=True))
    monkeypatch.setenv(F.ENV, "fast")
    with pytest.raises(ConfigError, match="KIMI_MLX_FAST_MATH"):
        F.active()
