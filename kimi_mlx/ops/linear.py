"""Quantized linear layers: MLX's quantized matmul (the reference), and a fast path for many rows.

Many rows (prefill): the weight dequantized and one dense matmul. MLX's CUDA quantized matmul of many rows runs a
tiled kernel well below the card's dense rate, where dequantizing the weight to the activations' dtype (one pass
over it) and a cuBLAS matmul run at several times that rate (RESULTS.md). The dense weight is a temporary of one
projection (at most ~42 MB at the real shape).

  DequantLinear  nn.QuantizedLinear whose call takes the dequantized path from MIN_ROWS rows where chosen; the
                 parent's quantized matmul otherwise, over one_matrix's layout
  one_matrix     a batched decode step's rows [B, 1, K] as one matrix [1, B, K] (a view)
KIMI_MLX_DEQUANT (kimi_mlx/settings.py) chooses. The decoder layers' quantized linears are
DequantLinear (model/fuse.py), lm_head is not.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


from .. import settings

ENV = "KIMI_MLX_DEQUANT"
MODES = ("auto", "on", "off")
MIN_ROWS = 256  # below this the quantized matmul reads less than the dense weight's write and read


def choose(f: settings.Facts, rows: int) -> str:
    """'dequant' (the weight dequantized, one dense matmul) or 'quantized' (MLX's quantized matmul) for a call
    over `rows` rows."""
    m = f[ENV]
    if m == "off" or rows < MIN_ROWS:
        return "quantized"
    return "dequant" if m == "on" or f.gpu == "cuda" else "quantized"


def dequant_chosen(rows: int) -> bool:
    from .kda import gpu_backend

    return choose(settings.now(gpu_backend()), rows) == "dequant"


def one_matrix(f, x: mx.array) -> mx.array:
    """f (a quantized matmul over x's last axis) with a batched decode step's x [B, 1, K] (B > 1) passed as one
    matrix [1, B, K] and the result shaped back to [B, 1, N]: the same rows, a view either way. MLX's quantized
    matmul treats [B, 1, K] as B matrices of one row (on CUDA: B mat-vecs, or from 8 of them a tiled GEMM per
    row, each reading the whole weight) and [1, B, K] as one B-row matrix whose tiles read the weight once
    (benchmarks/RESULTS.md times both layouts by row count)."""
    if x.ndim != 3 or x.shape[1] != 1 or x.shape[0] == 1:
        return f(x)
    y = f(x.reshape(1, x.shape[0], x.shape[2]))
    return y.reshape(x.shape[0], 1, y.shape[-1])


class DequantLinear(nn.QuantizedLinear):
    """A quantized linear layer whose calls of MIN_ROWS+ rows may run as dequantize + dense matmul."""

    def __call__(self, x):
        rows = x.size // x.shape[-1]
        if not dequant_chosen(rows):
            return one_matrix(super().__call__, x)
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
