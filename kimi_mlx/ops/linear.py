"""Quantized linear layers: MLX's quantized matmul (the reference), and two fast paths.

Many rows (prefill): the weight dequantized and one dense matmul. MLX's CUDA quantized matmul of many rows runs a
tiled kernel well below the card's dense rate, where dequantizing the weight to the activations' dtype (one pass
over it) and a cuBLAS matmul run at several times that rate (RESULTS.md). The dense weight is a temporary of one
projection (at most ~42 MB at the real shape).

Few rows (decode), opt-in: the qmv kernel (metal_kernels/qmv.body: each lane's 16-byte weight loads issued before
any is used, x in threadgroup memory, no integer-to-float conversions), for MLX's CUDA quantized matrix-vector
kernel, which reads a decoded token's projections well under the card's bandwidth. Off by default: where measured
it was within the noise of decode tok/s (RESULTS.md).

  DequantLinear  nn.QuantizedLinear whose call takes the dequantized path from MIN_ROWS rows where chosen, and
                 the qmv kernel up to QMV_MAX_ROWS rows where switched on; the parent's quantized matmul otherwise
KIMI_MLX_DEQUANT and KIMI_MLX_QMV (kimi_mlx/settings.py) choose. The decoder layers' quantized linears are
DequantLinear (model/fuse.py), lm_head is not.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from metal_kernels import usable

from .. import settings

ENV = "KIMI_MLX_DEQUANT"
MODES = ("auto", "on", "off")
MIN_ROWS = 256  # below this the quantized matmul reads less than the dense weight's write and read


QMV_ENV = "KIMI_MLX_QMV"
QMV_MAX_ROWS = 4  # a decode step's rows (one per sequence); more rows read each weight once per row
QMV_MAX_K = 4096  # x's row as float in threadgroup memory: 16 KB of the 32 Metal gives a threadgroup (the model's widest
#                   decode input, the KDA and MLA heads' 32 x 128 values into o_proj)
QMV_BITS = (2, 4, 8)
QMV_GROUPS = (32, 64, 128)


def qmv_fits(layer: nn.Module, rows: int) -> bool:
    """Whether the qmv kernel computes this call: a few rows of an affine 2/4/8-bit weight MLX packed into uint32
    words with biases (groups of 32, 64 or 128), of a width whose row fits in threadgroup memory."""
    K = layer.weight.shape[-1] * 32 // layer.bits if layer.bits in QMV_BITS else 0
    return (0 < rows <= QMV_MAX_ROWS and layer.mode == "affine" and layer.bits in QMV_BITS
            and layer.group_size in QMV_GROUPS and "biases" in layer and layer.weight.dtype == mx.uint32
            and layer.weight.ndim == 2 and 0 < K <= QMV_MAX_K and K % layer.group_size == 0)


def qmv_mode() -> str:
    return settings.value(QMV_ENV)


def qmv_chosen(layer: nn.Module, rows: int) -> bool:
    from .kda import gpu_backend

    return qmv_mode() == "on" and qmv_fits(layer, rows) and gpu_backend() is not None and usable("qmv")


def qmv(x: mx.array, layer: nn.Module) -> mx.array:
    """x [M, K] times the layer's quantized weight [N, K] transposed by the qmv kernel: [M, N] in the reference's
    dtype (x's and the scales' promoted), without the layer's bias."""
    from metal_kernels import group_rows, kernel

    M, K = x.shape
    N = layer.weight.shape[0]
    R = group_rows(N, 4)
    TY = group_rows(N // R, 8)
    (y,) = kernel("qmv")(
        inputs=[x, layer["weight"], layer["scales"], layer["biases"]],
        template=[("N", N), ("K", K), ("BITS", layer.bits), ("GS", layer.group_size), ("R", R), ("TY", TY)],
        grid=(32, N // R, M), threadgroup=(32, TY, 1),
        output_shapes=[(M, N)], output_dtypes=[mx.result_type(x, layer["scales"])],
    )
    return y


def dequant_chosen(rows: int) -> bool:
    from .kda import gpu_backend

    m = settings.value(ENV)
    if m == "off" or rows < MIN_ROWS:
        return False
    return m == "on" or gpu_backend() == "cuda"


class DequantLinear(nn.QuantizedLinear):
    """A quantized linear layer whose calls of MIN_ROWS+ rows may run as dequantize + dense matmul, and of up to
    QMV_MAX_ROWS rows as the qmv kernel (opt-in)."""

    def __call__(self, x):
        rows = x.size // x.shape[-1]
        if qmv_chosen(self, rows):
            y = qmv(x.reshape(rows, x.shape[-1]), self).reshape(*x.shape[:-1], -1)
            return y + self["bias"] if "bias" in self else y
        if not dequant_chosen(rows):
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
