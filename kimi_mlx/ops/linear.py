"""Quantized linear layers: MLX's quantized matmul (the reference), and a fast path for many rows.

Many rows (prefill): the weight dequantized and one dense matmul. MLX's CUDA quantized matmul of many rows runs a
tiled kernel well below the card's dense rate, where dequantizing the weight to the activations' dtype (one pass
over it) and a cuBLAS matmul run at several times that rate (RESULTS.md). The dense weight is a temporary of one
projection (at most ~42 MB at the real shape).

  DequantLinear  nn.QuantizedLinear whose call takes the dequantized path from MIN_ROWS rows where chosen; the
                 parent's quantized matmul otherwise, over one_matrix's layout
  one_matrix     a batched decode step's rows [B, 1, K] as one matrix [1, B, K] (a view), or a few rows padded
                 to PAD_ROWS where padded_rows chooses
KIMI_MLX_DEQUANT and KIMI_MLX_PAD_ROWS (kimi_mlx/settings.py) choose. The decoder layers' quantized linears are
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


def facts_now() -> settings.Facts:
    from .kda import gpu_backend

    return settings.now(gpu_backend())


def dequant_chosen(rows: int) -> bool:
    return choose(facts_now(), rows) == "dequant"


PAD_ENV = "KIMI_MLX_PAD_ROWS"
PAD_ROWS = 8  # MLX's CUDA quantized matmul runs a mat-vec a row below 8 rows, one tiled GEMM from 8
PAD_MIN_BYTES = 12_000_000  # (rows - 1) x weight bytes from which padding pays (see padded_rows)


def padded_rows(f: settings.Facts, rows: int, weight_bytes: int) -> int:
    """The rows a quantized matmul of `rows` rows (one matrix) over a weight of weight_bytes runs over: `rows`, or
    PAD_ROWS on CUDA where 2 <= rows < PAD_ROWS and (rows - 1) x weight_bytes >= PAD_MIN_BYTES. Below 8 rows MLX's
    CUDA kernel is a mat-vec that reads the weight once a row; padded with zero rows to 8 it is one GEMM reading
    it once, for a fixed cost (the GEMM's tiles, the pad and the slice). So padding pays once the extra rows'
    reads outweigh that fixed cost, which benchmarks/qmm_rows.py puts at about the read of 12 MB: lm_head (212 MB
    at 4 bits) pads from 2 rows, the KDA q|k|v projection (16 MB) from 2, the shared expert's down projection
    (1.3 MB) never. Metal's kernels differ and are not padded."""
    if f.gpu != "cuda" or f[PAD_ENV] == "off" or not 2 <= rows < PAD_ROWS:
        return rows
    return PAD_ROWS if (rows - 1) * weight_bytes >= PAD_MIN_BYTES else rows


def weight_bytes(layer: nn.Module) -> int:
    """The bytes a quantized layer's matmul reads: its packed weight, scales and biases."""
    return sum(layer[k].nbytes for k in ("weight", "scales", "biases") if k in layer)


def one_matrix(f, x: mx.array, weights: nn.Module | None = None, facts: settings.Facts | None = None) -> mx.array:
    """f (a quantized matmul over x's last axis) over x's rows as one matrix: a batched decode step's x [B, 1, K]
    (B > 1) passed as [1, B, K] and the result shaped back to [B, 1, N], a view either way; and where
    padded_rows chooses (weights: the quantized layer f reads; facts: settings.now's, made here if not given), a
    few rows padded with zeros to PAD_ROWS and the result sliced back. Each row's result is its own whichever
    the layout. MLX's quantized matmul treats [B, 1, K] as B matrices of one row (on CUDA: B mat-vecs, or from 8
    of them a tiled GEMM per row, each reading the whole weight) and [1, B, K] as one B-row matrix whose tiles
    read the weight once (benchmarks/RESULTS.md times the layouts by row count)."""
    rows = x.size // x.shape[-1]
    if x.ndim != 3 or (x.shape[0] > 1 and x.shape[1] > 1) or rows == 1:
        return f(x)
    flat = x.reshape(1, rows, x.shape[-1])
    if weights is not None and rows < PAD_ROWS:
        pad = padded_rows(facts if facts is not None else facts_now(), rows, weight_bytes(weights)) - rows
        if pad:
            flat = mx.concatenate([flat, mx.zeros((1, pad, x.shape[-1]), x.dtype)], axis=1)
            return f(flat)[:, :rows].reshape(*x.shape[:2], -1)
    return f(flat).reshape(*x.shape[:2], -1)


class DequantLinear(nn.QuantizedLinear):
    """A quantized linear layer whose calls of MIN_ROWS+ rows may run as dequantize + dense matmul."""

    def __call__(self, x):
        rows = x.size // x.shape[-1]
        facts = facts_now()
        if choose(facts, rows) != "dequant":
            return one_matrix(super().__call__, x, self, facts)
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
