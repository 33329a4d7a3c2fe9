"""Pieces shared by the layers: RMSNorm and the SwiGLU MLP."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..ops.fast_math import silu


class RMSNorm(nn.Module):
    """weight * x * rsqrt(mean(x^2) + eps), in float32 inside one fused op, rounded once to x's dtype.

    HF rounds the normalised x to the input dtype before the weight multiply; in float32 the two agree
    exactly, in bf16 within one rounding. One primitive instead of four (two casts, the norm, the
    multiply) matters in decode, where each primitive costs ~5 us on a GPU (RESULTS.md)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight.astype(x.dtype), self.eps)


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense FFN and the shared expert."""

    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden, bias=False)
        self.up_proj = nn.Linear(dims, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dims, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(silu(self.gate_proj(x)) * self.up_proj(x))
