"""ops.norm: the residual add + RMS norm kernel against its ops twin (emulated text on the CPU, MLX on a GPU)."""

import mlx.core as mx
import numpy as np
import pytest

import kernel_emulator
from kimi_mlx.errors import ConfigError
from kimi_mlx.ops import norm as N
from metal_kernels import group_rows


def inputs(rows: int, D: int, h_dtype, a_dtype, seed: int):
    """Rows of very different scale (1e-3 .. 1e3), branch outputs that cancel the residual in places."""
    rng = np.random.default_rng(seed)
    scale = np.array([1e-3, 1, 30, 1e3, 5, 0.2])[:rows, None]
    h = rng.standard_normal((rows, D)) * scale
    a = rng.standard_normal((rows, D)) * scale
    a[:, ::7] = -h[:, ::7]  # exact cancellation: s is 0 there
    w = rng.uniform(0.5, 1.5, D)
    return (mx.array(h.astype(np.float32)).astype(h_dtype), mx.array(a.astype(np.float32)).astype(a_dtype),
            mx.array(w.astype(np.float32)).astype(h_dtype))


def close(got, ref, dtype) -> bool:
    """Within a rounding of the dtype, per row relative to the row's largest value."""
    f32 = mx.float32
    scale = mx.maximum(mx.abs(ref.astype(f32)).max(axis=-1, keepdims=True), 1e-30)
    tol = 1e-5 if dtype == f32 else 1e-2
    return float((mx.abs(got.astype(f32) - ref.astype(f32)) / scale).max()) <= tol


@pytest.mark.skipif(not kernel_emulator.available(), reason="g++ is not installed")
@pytest.mark.parametrize("kind", ["metal", "cuda"])
@pytest.mark.parametrize("h_dtype,a_dtype", [(mx.float32, mx.float32), (mx.bfloat16, mx.bfloat16),
                                             (mx.bfloat16, mx.float32)], ids=["f32", "bf16", "bf16+f32"])
@pytest.mark.parametrize("D", [64, 96, 256])  # 2, 3 and 8 lane groups a row (S = 2, 1, 8)
def test_add_norm_kernel_text_runs_right_on_cpu(kind, h_dtype, a_dtype, D):
    rows = 6
    h, a, w = inputs(rows, D, h_dtype, a_dtype, seed=D)
    S = group_rows(D // 32, 8)
    s, y = kernel_emulator.emulate("add_norm", kind, [h, a, w, mx.array([1e-6], mx.float32)],
                                   (("D", D), ("S", S)), grid=(32 * S, rows, 1), threadgroup=(32 * S, 1, 1),
                                   output_shapes=[h.shape, h.shape], output_dtypes=[h_dtype, h_dtype])
    rs, ry = N.add_norm_ref(h, a, w, 1e-6)
    assert mx.array_equal(s, rs)  # the sum is rounded once to h's dtype, as the ops round it
    assert close(y, ry, h_dtype)


def test_add_norm_ref_is_the_add_then_the_norm():
    h, a, w = inputs(4, 64, mx.bfloat16, mx.float32, seed=1)
    s, y = N.add_norm_ref(h, a, w, 1e-6)
    assert s.dtype == y.dtype == mx.bfloat16
    assert mx.array_equal(s, h + a.astype(mx.bfloat16))
    assert mx.array_equal(y, mx.fast.rms_norm(s, w, 1e-6))


def test_add_norm_runs_the_ops_on_the_cpu_and_rejects_a_bad_mode(monkeypatch):
    h, a, w = inputs(2, 64, mx.float32, mx.float32, seed=2)
    with mx.stream(mx.cpu):
        for got, ref in zip(N.add_norm(h, a, w, 1e-6), N.add_norm_ref(h, a, w, 1e-6)):
            assert mx.array_equal(got, ref)
    monkeypatch.setenv(N.ENV, "fast")
    with pytest.raises(ConfigError, match="KIMI_MLX_NORM"):
        N.mode()


@pytest.mark.gpu
@pytest.mark.parametrize("a_dtype", [mx.bfloat16, mx.float32], ids=["bf16", "f32-branch"])  # f32: the fused MoE's sum
@pytest.mark.parametrize("rows", [1, 16])
def test_add_norm_kernel_on_gpu(rows, a_dtype):
    h, a, w = inputs(min(rows, 6), 2304, mx.bfloat16, a_dtype, seed=rows)
    h, a = mx.tile(h, (rows // h.shape[0] + 1, 1))[:rows], mx.tile(a, (rows // a.shape[0] + 1, 1))[:rows]
    (s, y), (rs, ry) = N.add_norm_kernel(h, a, w, 1e-6), N.add_norm_ref(h, a, w, 1e-6)
    assert mx.array_equal(s, rs) and close(y, ry, mx.bfloat16)


@pytest.mark.gpu
def test_doctor_add_norm_check_on_gpu():
    from kimi_mlx import doctor

    assert doctor.check_add_norm().ok


@pytest.mark.gpu
def test_compiled_decode_with_gpu_kernels_equals_eager_decode(hf_checkpoint):
    """A whole model's one-token steps on a GPU (the add + norm seams, the MLA row scattered into its page, the
    other decode kernels) against the eager reference steps, float32, over a page growth."""
    from kimi_mlx import load_model

    _, ckpt = hf_checkpoint("kmkm", hidden_size=128)
    model = load_model(ckpt)
    toks = mx.array(np.random.default_rng(3).integers(0, 211, (1, 300)))
    outs = []
    for compiled in (True, False):
        model.compile_decode = compiled
        state = model.new_state()
        model(toks[:, :250], state)
        outs.append(mx.concatenate([model(toks[:, t : t + 1], state) for t in range(250, 300)], axis=1))
    ref = outs[1]
    assert float(mx.abs(outs[0] - ref).max()) <= 1e-4 * float(mx.abs(ref).max())
