"""How MLX's quantized matmul costs rows: a batched decode step's rows passed as [B, 1, K] (B matrices of one row)
against [1, B, K] (one matrix of B rows, what ops/linear.one_matrix passes), and one row, at the full shape's
projection sizes (4-bit affine gs64, bf16 activations on a GPU, float32 on the CPU). Below 8 rows a third figure:
the rows padded with zero rows to a matrix of 8 (the pad and the slice back counted), which on CUDA takes MLX's
tiled GEMM instead of its row-by-row mat-vec.

  python benchmarks/qmm_rows.py                      # the full shape's sizes, rows 2,4,8,16
  python benchmarks/qmm_rows.py --rows 8 --scale 16  # sizes divided by 16 (a quick CPU run)

Each figure is the mean milliseconds of --calls calls queued together and evaluated once (the weight stays in
the GPU's L2 cache between calls where it fits, so the smaller matrices read at cache, not memory, speed: the
layouts compare, the absolute rates flatter).
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402

from kimi_mlx.ops.linear import PAD_ROWS  # noqa: E402  (rows from which MLX's CUDA quantized matmul is a GEMM)

ap = argparse.ArgumentParser()
ap.add_argument("--rows", default="2,4,8,16", help="comma-separated row counts B")
ap.add_argument("--scale", type=int, default=1, help="divide every matrix size by this (quick runs)")
ap.add_argument("--calls", type=int, default=50)
a = ap.parse_args()
try:
    rows = [int(r) for r in a.rows.split(",")]
except ValueError:
    ap.error(f"--rows takes comma-separated integers, got {a.rows!r}")
if a.scale < 1 or a.calls < 1 or any(r < 1 for r in rows):
    ap.error("--rows, --scale and --calls take positive numbers")

SIZES = [("kda q|k|v", 12288, 2304), ("kda o", 2304, 4096), ("mla q", 6144, 2304), ("shared gate|up", 2048, 2304),
         ("shared down", 2304, 1024), ("lm_head", 163840, 2304)]
dtype = mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32


def timed(f) -> float:
    mx.eval(f())
    mx.synchronize()
    t0 = time.perf_counter()
    mx.eval([f() for _ in range(a.calls)])
    mx.synchronize()
    return (time.perf_counter() - t0) / a.calls * 1e3


info = mx.device_info()
print(f"{mx.default_device()} {info.get('device_name') or info.get('architecture', '?')}, MLX {mx.__version__}; "
      f"4-bit gs64, {str(dtype).split('.')[-1]}; ms a call, [B, 1, K] / [1, B, K] (/ padded to 8 rows, B < 8)")
print(f"| matrix | N | K | 1 row | " + " | ".join(f"B = {b}" for b in rows) + " |")
print("|---|---|---|---|" + "---|" * len(rows))
for name, N, K in SIZES:
    N, K = max(64, N // a.scale // 64 * 64), max(64, K // a.scale // 64 * 64)
    wq, s, b = mx.quantize(mx.random.normal((N, K)).astype(dtype), 64, 4)
    mx.eval(wq, s, b)

    def qmm(x):
        return mx.quantized_matmul(x, wq, s, b, True, 64, 4)

    x1 = mx.random.normal((1, 1, K)).astype(dtype)
    cells = []
    for B in rows:
        xa = mx.random.normal((B, 1, K)).astype(dtype)
        xb = xa.reshape(1, B, K)
        mx.eval(xa, xb)
        cell = f"{timed(lambda: qmm(xa)):.3f} / {timed(lambda: qmm(xb)):.3f}"
        if B < PAD_ROWS:
            cell += f" / {timed(lambda: qmm(mx.pad(xb, [(0, 0), (0, PAD_ROWS - B), (0, 0)]))[:, :B]):.3f}"
        cells.append(cell)
    print(f"| {name} | {N} | {K} | {timed(lambda: qmm(x1)):.3f} | " + " | ".join(cells) + " |", flush=True)
