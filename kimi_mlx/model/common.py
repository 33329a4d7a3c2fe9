"""Pieces shared by the layers: RMSNorm and the SwiGLU MLP."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps), computed in float32, cast back, then times weight (HF order)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        y = mx.fast.rms_norm(x.astype(mx.float32), None, self.eps).astype(x.dtype)
        return self.weight.astype(x.dtype) * y


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense FFN and the shared expert."""

    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden, bias=False)
        self.up_proj = nn.Linear(dims, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dims, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))
