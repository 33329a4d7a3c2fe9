"""MoE expert matmuls for a few (token, expert) pairs (decode): gate|up bank, SwiGLU, down bank, weighted sum.

  experts_ref     MLX's gather_qmm (or gather_mm) over the two banks, SwiGLU and the weighted sum in
                  plain ops (the reference)
  experts_kernel  two Metal or CUDA kernels (metal_kernels/moe_gate_up.body, moe_down.body): each pair's
                  gate and up rows and their SwiGLU, then each pair's down rows weighted and summed over
                  the token's pairs. Two launches where the reference runs seven (the uint32 cast of the
                  indices, gather_qmm's copy, two gather matmuls, SwiGLU, weighting, sum), and a GEMV
                  where MLX's gather_qmm runs a tiled GEMM from 8 pairs on (a matrix-vector product's work
                  at a GEMM's launch cost).
                  wide=True: the same results through moe_gate_up_wide and moe_down_wide, which read a row's
                  packed words 16 bytes a load and issue all of a lane's loads before its first product
                  (a bank whose rows do not split into such chunks takes the word-wise kernel)
  kernel_fits     whether the kernels read a pair of banks (affine quantization, 2, 4 or 8 bits; <= 32 pairs a token)
model/fuse.py's expert_path chooses between them (KIMI_MLX_EXPERTS=gather|kernel|wide overrides).
Both take x [N, D], idx [N, P] int32, w [N, P] float32 and the banks gate_up [E, 2I, D] (gate rows, then up
rows) and down [E, D, I] (QuantizedSwitchLinear or SwitchLinear); both return [N, D] float32.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn

KERNEL_BITS = (2, 4, 8)
MAX_PAIRS = 32


def experts_ref(x, idx, w, gate_up, down):
    N, P = idx.shape
    rows_in, rows_mid = _rows(N, P)
    idx = idx.astype(mx.uint32)
    g, u = mx.split(gate_up(x[:, None, None], idx, lhs_indices=rows_in), 2, axis=-1)
    return weighted_sum(down(nn.silu(g) * u, idx, lhs_indices=rows_mid), w)


def weighted_sum(y, w):
    """Each pair's expert output y [N * P, D] (or [N, P, D]) times its router weight w [N, P], summed over a
    token's pairs in float32, in pair order: [N, D]."""
    N, P = w.shape
    return _weighted_sum(y.reshape(N, P, -1), w)


@mx.compile
def _weighted_sum(y, w):
    """As one fused elementwise pass that reads y once (a cast, multiply and reduction over [N, P, D] run three
    passes and write two float32 copies of it)."""
    out = y[:, 0].astype(mx.float32) * w[:, 0:1]
    for j in range(1, y.shape[1]):
        out = out + y[:, j].astype(mx.float32) * w[:, j : j + 1]
    return out


@lru_cache(maxsize=8)
def _rows(N: int, P: int) -> tuple[mx.array, mx.array]:
    """gather_qmm's row indices for N tokens of P pairs: the gate|up bank reads token n, the down bank
    pair n * P + j. Explicit (and made once) so gather_qmm builds no index arrays in every decode step."""
    rows = (mx.broadcast_to(mx.arange(N, dtype=mx.uint32)[:, None], (N, P)) + 0,
            mx.arange(N * P, dtype=mx.uint32).reshape(N, P))
    mx.eval(rows)
    return rows


def _bank_misfit(bank, name: str) -> str | None:
    """Why the kernels cannot read this bank, or None."""
    mode, bits = getattr(bank, "mode", None), getattr(bank, "bits", None)
    if mode is None or "scales" not in bank:
        return f"the {name} bank is unquantized"
    if mode != "affine" or bits not in KERNEL_BITS or "biases" not in bank or bank.weight.dtype != mx.uint32:
        return f"the {name} bank is {bits}-bit {mode} (the kernels read affine {'/'.join(map(str, KERNEL_BITS))}-bit)"
    return None


def kernel_misfit(gate_up, down, pairs_per_token: int) -> str | None:
    """Why the kernels cannot compute these banks, or None: they read affine 2/4/8-bit banks (MLX's groups of 32,
    64 or 128 then hold whole words) and up to MAX_PAIRS pairs a token (moe_down gives each its own 32 lanes of
    one threadgroup)."""
    if pairs_per_token > MAX_PAIRS:
        return f"{pairs_per_token} experts a token (the kernels take up to {MAX_PAIRS})"
    return _bank_misfit(gate_up, "gate|up") or _bank_misfit(down, "down")


def kernel_fits(gate_up, down, pairs_per_token: int) -> bool:
    return kernel_misfit(gate_up, down, pairs_per_token) is None


UNITS = 4  # rows a 32-lane group computes (each token value a lane reads serves them all), at most
WIDE_UNITS = 2  # moe_gate_up_wide's hidden units a group, at most: a lane holds all its rows' loads in registers
WIDE_DOWN_UNITS = 4  # moe_down_wide's output rows a threadgroup, at most (<= 32: that many lanes sum the pairs)


def units(n: int, most: int = UNITS) -> int:
    """Rows a group for n rows: the largest power of two <= most dividing n."""
    from metal_kernels import group_rows

    return group_rows(n, most)


def wide_fits(bank) -> bool:
    """Whether the wide kernels read this (kernel-fit) bank: its rows split into chunks of 4 words, each chunk within
    one scale group."""
    values = 128 // bank.bits  # a chunk's values
    cols = bank.weight.shape[-1] * 32 // bank.bits
    return cols % values == 0 and bank.group_size % values == 0


def _template(D: int, I: int, P: int, bank, R: int) -> list[tuple[str, int]]:
    return [("D", D), ("I", I), ("P", P), ("BITS", bank.bits), ("GS", bank.group_size), ("R", R)]


def _gate_up_grid(N: int, P: int, I: int, R: int) -> dict:
    from metal_kernels import group_rows

    return dict(grid=(32 * N * P, I // R, 1), threadgroup=(32, group_rows(I // R), 1))


UNION_TOKENS = 4  # tokens moe_gate_up_union computes at once against an expert's rows (TB)


def experts_kernel(x, idx, w, gate_up, down, union: bool = False, wide: bool = False):
    """union: the gate|up bank through moe_gate_up_union, each expert of the tokens' union read once however many
    of the tokens route to it (a batch's decode step: B tokens, B * P pairs), after one argsort of the pairs.
    wide: each bank that wide_fits through the wide kernels (16-byte loads, all issued before the products)."""
    from metal_kernels import kernel, sizes

    N, P = idx.shape
    D = x.shape[-1]
    I = gate_up.weight.shape[1] // 2
    idx = idx.astype(mx.int32)  # the routing kernel's dtype already: no copy
    banks = [gate_up.weight, gate_up.scales, gate_up.biases]
    if union:
        order = mx.argsort(idx.reshape(-1)).astype(mx.int32)
        (h,) = kernel("moe_gate_up_union")(
            inputs=[x, idx, order, sizes(N * P), *banks],
            template=_template(D, I, P, gate_up, units(I)) + [("TB", UNION_TOKENS)],
            output_shapes=[(N * P, I)], output_dtypes=[mx.float32], **_gate_up_grid(N, P, I, units(I)),
        )
    else:
        wide_up = wide and wide_fits(gate_up)
        R = units(I, WIDE_UNITS) if wide_up else units(I)
        (h,) = kernel("moe_gate_up_wide" if wide_up else "moe_gate_up")(
            inputs=[x, idx, *banks], template=_template(D, I, P, gate_up, R),
            output_shapes=[(N * P, I)], output_dtypes=[mx.float32], **_gate_up_grid(N, P, I, R),
        )
    return _down(h, idx, w, down, wide and wide_fits(down))


def _down(h, idx, w, down, wide: bool = False):
    """moe_down (moe_down_wide): each pair's down rows of h [N * P, I], weighted by w and summed over a token's
    pairs."""
    from metal_kernels import kernel

    N, P = idx.shape
    D, I = down.weight.shape[1], h.shape[-1]
    Rd = units(D, WIDE_DOWN_UNITS) if wide else units(D)
    (y,) = kernel("moe_down_wide" if wide else "moe_down")(
        inputs=[h, idx, w.astype(mx.float32), down.weight, down.scales, down.biases],
        template=_template(D, I, P, down, Rd), grid=(32 * D // Rd, P, N), threadgroup=(32, P, 1),
        output_shapes=[(N, D)], output_dtypes=[mx.float32],
    )
    return y
