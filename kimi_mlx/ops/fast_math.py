"""exp for MLX's CPU backend, and the sigmoid, SiLU and softmax built on it.

MLX's CPU backend on x86 evaluates exp one element at a time (~11 ns an element on the test machine, about 20x
numpy's; compiling it does not change that: RESULTS.md), so the exp over attention scores and the SiLU of the MoE
rows take a large share of a CPU prefill step, and the decode softmax over a long MLA page most of that layer.
Here exp is a range reduction (x = n ln2 + f, ln2 in two parts) and a degree-7 Taylor polynomial for e^f
(|f| <= ln2 / 2), scaled by 2^n through the exponent bits: two compiled elementwise passes, 3-4x faster here,
within a few float32 ulp of mx.exp. Below -87.34 (under float32's smallest normal) it gives 0, above 88.37 inf
(mx.exp reaches inf at 88.72: nothing here takes e^x of anything near that), NaN stays NaN.

The reference twins are MLX's own (mx.exp, mx.sigmoid, nn.silu, mx.softmax precise), which every GPU path keeps.
KIMI_MLX_FAST_MATH: auto (the polynomial on the CPU), off (MLX's everywhere).
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn

from .. import settings

ENV = "KIMI_MLX_FAST_MATH"
LOG2E = 1.4426950408889634
LN2_HI, LN2_LO = 0.693359375, -2.12194440e-4  # ln 2 = HI + LO; n * HI is exact for the n used here
LOWEST, HIGHEST = -87.33654, 88.376  # 2^n stays a normal float32 in between: n from -126 to 127


@partial(mx.compile, shapeless=True)
def _reduce(x, minus):
    """x - minus (in float32) = n ln2 + f: (e^f by the polynomial, 2^n as float32 bits in an int32: 0 below
    LOWEST, the bits of inf above HIGHEST)."""
    x = x.astype(mx.float32) - minus
    xc = mx.clip(x, LOWEST, HIGHEST)
    n = mx.floor(xc * LOG2E + 0.5)
    f = (xc - n * LN2_HI) - n * LN2_LO
    p = 1.0 + f * (1.0 + f * (0.5 + f * (1 / 6 + f * (1 / 24 + f * (1 / 120 + f * (1 / 720 + f * (1 / 5040)))))))
    bits = mx.where(x < LOWEST, 0, mx.where(x > HIGHEST, 255 << 23, (n.astype(mx.int32) + 127) << 23))
    return p, bits


@partial(mx.compile, shapeless=True)
def _scale(p, two_n, like):
    return (p * two_n).astype(like.dtype)


def exp_poly(x: mx.array, minus: mx.array | float = 0.0, dtype: mx.Dtype | None = None) -> mx.array:
    """e^(x - minus), float32 inside, in dtype (x's by default): two compiled passes with the exponent bits
    reinterpreted between them (a compiled graph for any shape cannot hold the reinterpretation)."""
    p, bits = _reduce(x, minus)
    return _scale(p, bits.view(mx.float32), mx.zeros((), dtype or x.dtype))


def _sigmoid(x):
    return (1.0 / (1.0 + exp_poly(-x.astype(mx.float32)))).astype(x.dtype)


def _silu(x):
    xf = x.astype(mx.float32)
    return (xf / (1.0 + exp_poly(-xf))).astype(x.dtype)


def _softmax(s):
    e = exp_poly(s, s.max(-1, keepdims=True).astype(mx.float32), mx.float32)
    return (e / e.sum(-1, keepdims=True)).astype(s.dtype)


def active() -> bool:
    """Whether the polynomial runs here: on the CPU, unless KIMI_MLX_FAST_MATH=off."""
    return settings.value(ENV) == "auto" and mx.default_device() == mx.cpu


def exp(x: mx.array) -> mx.array:
    return exp_poly(x) if active() else mx.exp(x)


def sigmoid(x: mx.array) -> mx.array:
    return _sigmoid(x) if active() else mx.sigmoid(x)


def silu(x: mx.array) -> mx.array:
    return _silu(x) if active() else nn.silu(x)


def softmax(s: mx.array) -> mx.array:
    """Over the last axis, float32 inside, in s's dtype (mx.softmax(s, axis=-1, precise=True) elsewhere)."""
    return _softmax(s) if active() else mx.softmax(s, axis=-1, precise=True)
