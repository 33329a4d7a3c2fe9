"""Quantized linear layers' fast path (ops/linear.py) against MLX's quantized matmul: many rows dequantized + a
dense matmul; and the choice of path."""

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


@pytest.mark.parametrize("shape", [(3, 1, 128), (1, 5, 128), (2, 1, 128), (7, 1, 128)], ids=["batch3", "verify5",
                                                                                           "batch2", "batch7"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_a_few_rows_padded_to_one_gemm_give_each_row_its_own_result(monkeypatch, shape, bias):
    """one_matrix where padded_rows pads (forced here on the CPU by a CUDA backend and a tiny byte threshold):
    the zero rows change no row's result, and the result has x's leading shape."""
    from kimi_mlx.ops import kda

    lin = quantized(128, 96, 4, bias)
    linear.dequant_linears(lin)
    x = mx.random.normal(shape)
    monkeypatch.setenv(linear.PAD_ENV, "off")
    plain = lin(x)
    rows = [lin(x.reshape(-1, 128)[i].reshape(1, 1, 128)) for i in range(x.size // 128)]
    monkeypatch.setenv(linear.PAD_ENV, "auto")
    monkeypatch.setattr(kda, "gpu_backend", lambda: "cuda")
    monkeypatch.setattr(linear, "PAD_MIN_BYTES", 1)
    assert linear.padded_rows(linear.settings.now("cuda"), x.size // 128, linear.weight_bytes(lin)) == 8
    padded = lin(x)
    assert padded.shape == plain.shape == (*shape[:2], 96)
    assert mx.array_equal(padded, plain).item()
    assert mx.array_equal(padded.reshape(-1, 96), mx.concatenate(rows).reshape(-1, 96)).item()
