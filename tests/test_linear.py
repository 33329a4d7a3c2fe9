"""Quantized linear layers' fast paths (ops/linear.py) against MLX's quantized matmul: many rows dequantized + a
dense matmul, a few rows through the qmv kernel; and the choice of path."""

import mlx.core as mx
import mlx.nn as nn
import pytest

from kimi_mlx.errors import ConfigError
from kimi_mlx.ops import linear


def quantized(d_in, d_out, bits, bias, dtype=mx.float32, seed=0):
    mx.random.seed(seed)
    lin = nn.Linear(d_in, d_out, bias=bias)
    lin.set_dtype(dtype)
    return nn.QuantizedLinear.from_linear(lin, group_size=64, bits=bits)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype,x_dtype", [(mx.float32, mx.float32), (mx.bfloat16, mx.bfloat16),
                                           (mx.float32, mx.bfloat16)], ids=["f32", "bf16", "f32-weights-bf16-x"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_dequant_matches_quantized_matmul(monkeypatch, bits, dtype, x_dtype, bias):
    monkeypatch.setenv(linear.ENV, "on")
    ref = quantized(128, 96, bits, bias, dtype)
    fast = quantized(128, 96, bits, bias, dtype)
    assert linear.dequant_linears(fast) == 1 and type(fast) is linear.DequantLinear
    x = mx.random.normal((2, linear.MIN_ROWS // 2 + 3, 128)).astype(x_dtype)
    want, got = ref(x), fast(x)
    assert got.dtype == want.dtype and got.shape == want.shape
    # both against the quantized weight's exact product in float32 (MLX's CPU quantized matmul of bfloat16 rows
    # rounds coarser than the dense bfloat16 matmul: 2.7e-2 vs 6.6e-3 of the largest output here)
    w = mx.dequantize(ref.weight, ref.scales, ref.biases, group_size=64, bits=bits).astype(mx.float32)
    exact = x.astype(mx.float32) @ w.T + (ref.bias.astype(mx.float32) if bias else 0)
    scale = mx.abs(exact).max().item()
    tol = 1e-5 if x_dtype == mx.float32 and dtype == mx.float32 else 1e-2
    assert mx.abs(got.astype(mx.float32) - exact).max().item() <= tol * scale
    assert mx.abs(want.astype(mx.float32) - exact).max().item() <= 4e-2 * scale


def test_choice(monkeypatch):
    monkeypatch.delenv(linear.ENV, raising=False)
    from kimi_mlx.ops.kda import gpu_backend
    assert linear.dequant_chosen(linear.MIN_ROWS) == (gpu_backend() == "cuda")
    monkeypatch.setenv(linear.ENV, "on")
    assert linear.dequant_chosen(linear.MIN_ROWS) and not linear.dequant_chosen(linear.MIN_ROWS - 1)
    monkeypatch.setenv(linear.ENV, "off")
    assert not linear.dequant_chosen(10**6)
    monkeypatch.setenv(linear.ENV, "always")
    with pytest.raises(ConfigError, match="KIMI_MLX_DEQUANT"):
        linear.dequant_chosen(10**6)


def test_few_rows_take_the_quantized_matmul(monkeypatch):
    """Under MIN_ROWS rows (decode) the call is the parent's: the same graph, no dense weight."""
    monkeypatch.setenv(linear.ENV, "on")
    lin = quantized(128, 64, 4, False)
    linear.dequant_linears(lin)
    called = []
    monkeypatch.setattr(mx, "dequantize", lambda *a, **k: called.append(1))
    lin(mx.random.normal((1, 8, 128)))
    assert not called


# The qmv kernel (decode: a few rows) -------------------------------------------------------------------------

import kernel_emulator  # noqa: E402
import metal_kernels  # noqa: E402

QMV_CASES = [  # bits, group size, K, N, rows, dtype of x and the layer
    (4, 64, 320, 48, 1, mx.float32),  # 10 chunks a row: one step, most lanes idle
    (4, 32, 2304, 64, 2, mx.bfloat16),  # the real width: 72 chunks, a ragged third step
    (8, 64, 192, 40, 3, mx.bfloat16),  # 16 values a chunk; 10 groups of rows, 2 a threadgroup
    (2, 128, 256, 24, 1, mx.float32),  # 2-bit: two words a chunk
    (4, 128, 1152, 36, 4, mx.float32),  # 9 groups of rows: one a threadgroup
]


def qmv_inputs(bits, gs, K, N, rows, dtype, seed=0):
    mx.random.seed(seed)
    lin = nn.Linear(K, N, bias=False)
    lin.weight = lin.weight * mx.exp(mx.random.uniform(-3, 3, (N, 1)))  # rows over six orders of magnitude
    lin.set_dtype(dtype)
    q = nn.QuantizedLinear.from_linear(lin, group_size=gs, bits=bits)
    x = (30 * mx.random.normal((rows, K)) * mx.exp(mx.random.uniform(-4, 4, (1, K)))).astype(dtype)
    return q, x


def exact_product(q, x):
    """In float32 throughout (dequantizing with bfloat16 scales would round every weight to bfloat16 first)."""
    f32 = mx.float32
    w = mx.dequantize(q.weight, q.scales.astype(f32), q.biases.astype(f32), group_size=q.group_size, bits=q.bits)
    return x.astype(f32) @ w.T


@pytest.mark.skipif(not kernel_emulator.available(), reason="g++ is not installed")
@pytest.mark.parametrize("kind", ["metal", "cuda"])
@pytest.mark.parametrize("case", QMV_CASES, ids=lambda c: f"b{c[0]}g{c[1]}k{c[2]}n{c[3]}m{c[4]}{str(c[5])[-4:]}")
def test_qmv_kernel_text_runs_right_on_cpu(monkeypatch, kind, case):
    """The qmv text through its ops wrapper against the quantized weight's exact product (and MLX's quantized
    matmul): partial steps, every bit width, activations and rows far from unit size."""
    monkeypatch.setattr(metal_kernels, "kernel", kernel_emulator.kernel_factory(kind))
    q, x = qmv_inputs(*case)
    got = linear.qmv(x, q)
    want = q(x)
    assert got.dtype == want.dtype and got.shape == want.shape
    exact = exact_product(q, x)
    scale = mx.abs(exact).max().item()
    tol = 1e-5 if case[-1] == mx.float32 else 1e-2  # bf16: the output's rounding
    assert mx.abs(got.astype(mx.float32) - exact).max().item() <= tol * scale
    # small rows too, not only the largest: each row against its own scale
    row_err = mx.abs(got.astype(mx.float32) - exact).max(axis=0) / (mx.abs(exact).max(axis=0) + 1e-30)
    assert row_err.max().item() <= (1e-4 if case[-1] == mx.float32 else 2e-2)


@pytest.mark.skipif(not kernel_emulator.available(), reason="g++ is not installed")
def test_few_rows_take_the_qmv_kernel_where_chosen(monkeypatch):
    """DequantLinear with KIMI_MLX_QMV=on: 1-4 rows (any leading shape) through qmv with the bias added, 5 rows
    through the parent."""
    from kimi_mlx.ops import kda

    monkeypatch.setattr(kda, "gpu_backend", lambda: "cuda")
    monkeypatch.setenv(linear.QMV_ENV, "on")
    launched = []
    emulated = kernel_emulator.kernel_factory("cuda")
    monkeypatch.setattr(metal_kernels, "kernel", lambda name: launched.append(name) or emulated(name))
    ref = quantized(256, 40, 4, True)
    fast = quantized(256, 40, 4, True)
    linear.dequant_linears(fast)
    for shape in ((1, 1, 256), (2, 1, 256), (4, 256)):
        x = mx.random.normal(shape)
        got, want = fast(x), ref(x)
        assert got.shape == want.shape and mx.abs(got - want).max().item() <= 1e-4 * mx.abs(want).max().item()
    assert launched == ["qmv"] * 3
    fast(mx.random.normal((5, 256)))
    assert launched == ["qmv"] * 3


def test_qmv_choice(monkeypatch):
    from kimi_mlx.ops import kda

    q4, q3 = quantized(256, 40, 4, False), quantized(256, 40, 3, False)
    wide = quantized(linear.QMV_MAX_K + 64, 8, 4, False)
    monkeypatch.delenv(linear.QMV_ENV, raising=False)
    for backend in ("cuda", "metal", None):
        monkeypatch.setattr(kda, "gpu_backend", lambda b=backend: b)
        assert not linear.qmv_chosen(q4, 1)  # off by default (a few percent of a token)
    monkeypatch.setenv(linear.QMV_ENV, "on")
    for backend in ("cuda", "metal"):
        monkeypatch.setattr(kda, "gpu_backend", lambda b=backend: b)
        assert linear.qmv_chosen(q4, linear.QMV_MAX_ROWS) and not linear.qmv_chosen(q4, linear.QMV_MAX_ROWS + 1)
        assert not linear.qmv_chosen(q3, 1) and not linear.qmv_chosen(wide, 1)
    monkeypatch.setattr(kda, "gpu_backend", lambda: None)
    assert not linear.qmv_chosen(q4, 1)  # no GPU: never
    monkeypatch.setenv(linear.QMV_ENV, "auto")
    with pytest.raises(ConfigError, match="KIMI_MLX_QMV"):
        linear.qmv_chosen(q4, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(12288, 2304, 4), (2304, 4096, 4), (288, 2304, 8), (6720, 2304, 4),
                                   (163840, 2304, 4)], ids=lambda s: f"{s[0]}x{s[1]}b{s[2]}")
@pytest.mark.parametrize("rows", [1, 3])
def test_qmv_on_gpu_at_the_model_shapes(shape, rows):
    """The model's decode projections (q|k|v, o, the KDA gates' 8-bit inputs, MLA's inputs, lm_head) in bfloat16
    against the exact product and MLX's quantized matmul."""
    N, K, bits = shape
    q, x = qmv_inputs(bits, 64, K, N, rows, mx.bfloat16, seed=N % 97)
    got, want, exact = linear.qmv(x, q), q(x), exact_product(q, x)
    scale = mx.abs(exact).max().item()
    assert mx.abs(got.astype(mx.float32) - exact).max().item() <= 1e-2 * scale
    assert mx.abs(want.astype(mx.float32) - exact).max().item() <= 4e-2 * scale
