"""Residual add then RMS norm: h + a, and rms_norm of that sum (a decoder layer's seams in decode).

add_norm_ref is the reference (the add, then mx.fast.rms_norm); add_norm_kernel runs both as one launch
(metal_kernels/add_norm.body), with mx.fast.rms_norm's rounding. add_norm picks the kernel on a GPU for up to
KERNEL_ROWS rows (decode; prefill keeps the ops, whose launches are few against its matmuls), unless
KIMI_MLX_NORM=ref.
"""

from __future__ import annotations

import mlx.core as mx

from .. import settings

ENV = "KIMI_MLX_NORM"
MODES = ("auto", "ref")
KERNEL_ROWS = 16


def add_norm_ref(h, a, weight, eps: float) -> tuple[mx.array, mx.array]:
    """(s, y): s = h + a in h's dtype, y = rms_norm(s) * weight in h's dtype."""
    s = h + a.astype(h.dtype)
    return s, mx.fast.rms_norm(s, weight.astype(h.dtype), eps)


def add_norm_kernel(h, a, weight, eps: float) -> tuple[mx.array, mx.array]:
    """add_norm_ref as one kernel; the width a multiple of 32."""
    from metal_kernels import group_rows, kernel

    D = h.shape[-1]
    N = h.size // D
    S = group_rows(D // 32, 8)  # 32-lane groups sharing a row
    s, y = kernel("add_norm")(
        inputs=[h, a, weight.astype(h.dtype), mx.array([eps], mx.float32)], template=[("D", D), ("S", S)],
        grid=(32 * S, N, 1), threadgroup=(32 * S, 1, 1),
        output_shapes=[h.shape, h.shape], output_dtypes=[h.dtype, h.dtype],
    )
    return s, y


def mode() -> str:
    return settings.value(ENV)


def choose(f: settings.Facts, D: int, rows: int, same_shape: bool) -> str:
    """'kernel' or 'ref' for an add + norm over rows of width D (same_shape: h and a alike)."""
    fits = D % 32 == 0 and rows <= KERNEL_ROWS and same_shape
    return "kernel" if f[ENV] != "ref" and f.gpu and fits and f.usable("add_norm") else "ref"


def add_norm(h, a, weight, eps: float) -> tuple[mx.array, mx.array]:
    """h [..., D] (the residual), a [..., D] (a branch's output, any float dtype) -> (h + a, its rms_norm)."""
    from .kda import gpu_backend

    D = h.shape[-1]
    if choose(settings.now(gpu_backend()), D, h.size // D, a.shape == h.shape) == "kernel":
        return add_norm_kernel(h, a, weight, eps)
    return add_norm_ref(h, a, weight, eps)
