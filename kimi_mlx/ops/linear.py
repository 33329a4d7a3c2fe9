"""Quantized linear layers over many rows (prefill): MLX's quantized matmul, or the weight dequantized and one
dense matmul.

On CUDA MLX 0.32 runs a quantized matmul of many rows with its sm80 tiled kernel at ~140 TFLOPS on an H200
(a 2,048-token step's q|k|v projection: 0.8 ms, RESULTS.md), where dequantizing the weight to the activations'
dtype (one pass over it, ~20 us for 12288 x 2304) and a cuBLAS matmul runs at several times that rate. The
dense weight is a temporary of one projection (at most ~42 MB at the real shape).

  DequantLinear  nn.QuantizedLinear whose call takes that path from MIN_ROWS rows where chosen; the parent's
                 quantized matmul (the reference) otherwise
KIMI_MLX_DEQUANT: auto (default: on CUDA only), on (every backend; tests), off (never).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import env_choice

ENV = "KIMI_MLX_DEQUANT"
MODES = ("auto", "on", "off")
MIN_ROWS = 256  # below this the quantized matmul reads less than the dense weight's write and read


def dequant_chosen(rows: int) -> bool:
    from .kda import gpu_backend

    m = env_choice(ENV, MODES, "auto")
    if m == "off" or rows < MIN_ROWS:
        return False
    return m == "on" or gpu_backend() == "cuda"


class DequantLinear(nn.QuantizedLinear):
    """A quantized linear layer whose calls of MIN_ROWS+ rows may run as dequantize + dense matmul."""

    def __call__(self, x):
        if not dequant_chosen(x.size // x.shape[-1]):
            return super().__call__(x)
        w = mx.dequantize(self["weight"], self["scales"], self.get("biases"), group_size=self.group_size,
                          bits=self.bits, mode=self.mode)  # in the scales' dtype
        y = x @ w.T  # the reference's result dtype: x's and the scales' promoted
        return y + self["bias"] if "bias" in self else y


def dequant_linears(module: nn.Module) -> int:
    """Turn every nn.QuantizedLinear under module into a DequantLinear (same parameters). Returns how many."""
    n = 0
    for _, m in module.named_modules():
        if type(m) is nn.QuantizedLinear:
            m.__class__ = DequantLinear
            n += 1
    return n
