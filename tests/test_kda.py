"""KDA paths against their references: chunked prefill, fused decode step (ops, Metal/CUDA text),
the dispatcher, and a tiny model. GPU-marked tests run on the device machine (README there)."""

import math

import mlx.core as mx
import numpy as np
import pytest

import kernel_emulator
from kimi_mlx.config import ModelConfig
from kimi_mlx.errors import ConfigError
from kimi_mlx.model.decoder import Model
from kimi_mlx.ops import kda as kda_ops
from kimi_mlx.ops import kda_chunked, kda_decode
from kimi_mlx.ops.kda import kda_recurrent_ref, l2_normalize
from kimi_mlx.ops.kda_chunked import kda_chunked as chunked
from kimi_mlx.ops.kda_decode import decode_step_kernel, decode_step_ops, decode_step_ref

TOL = 1e-4  # float32, relative to the largest magnitude
SHAPE = dict(B=2, H=3, Dk=40, Dv=24)  # every dim distinct, so a transposition cannot hide


def rel_err(a, b):
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    assert np.isfinite(a).all()
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-30))


def gate_inputs(shape, extreme):
    """Pre-softplus gate values and A_log; extreme: A up to 16 and large positive pre-activations."""
    a = mx.random.normal(shape)
    if not extreme:
        return a, mx.random.uniform(0.0, math.log(2.0), (shape[-2],))
    a_log = mx.random.uniform(math.log(4.0), math.log(16.0), (shape[-2],))
    a = mx.where(mx.random.uniform(shape=shape) < 0.6, mx.random.uniform(30.0, 200.0, shape), a)
    return a, a_log


def inputs(T, B, H, Dk, Dv, seed, extreme=False, dtype=mx.float32, random_state=True):
    """Raw q, k, v in `dtype`; log-gate g and beta in f32; state [B, H, Dv, Dk]."""
    mx.random.seed(seed)
    q, k = (mx.random.normal((B, T, H, Dk)).astype(dtype) for _ in range(2))
    v = mx.random.normal((B, T, H, Dv)).astype(dtype)
    a, a_log = gate_inputs((B, T, H, Dk), extreme)
    g = -mx.exp(a_log)[:, None] * kda_ops.softplus(a)
    beta = mx.sigmoid(mx.random.normal((B, T, H)))
    state = mx.random.normal((B, H, Dv, Dk)) if random_state else mx.zeros((B, H, Dv, Dk))
    return q, k, v, g, beta, state


def normalised(q, k, v, g, beta, state):
    return l2_normalize(q) * q.shape[-1] ** -0.5, l2_normalize(k), v, g, beta, state


def max_chunk_span(g):
    """Largest |sum of g| over one 64-row chunk (any batch, head, channel)."""
    T = g.shape[1]
    n = -(-T // 64)
    g = mx.pad(g, [(0, 0), (0, n * 64 - T), (0, 0), (0, 0)]).reshape(g.shape[0], n, 64, *g.shape[2:])
    return float(-g.sum(2).min())


# -- chunked prefill ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("random_state", [False, True], ids=["zero-state", "random-state"])
@pytest.mark.parametrize("extreme", [False, True], ids=["gates", "extreme-gates"])
@pytest.mark.parametrize("T", [1, 2, 63, 64, 65, 130])
def test_chunked_matches_reference(T, extreme, random_state, dtype):
    x = normalised(*inputs(T, **SHAPE, seed=T, extreme=extreme, dtype=dtype, random_state=random_state))
    o_ref, s_ref = kda_recurrent_ref(*x)
    o, s = chunked(*x)
    assert rel_err(o, o_ref) <= TOL
    assert rel_err(s, s_ref) <= TOL


def test_extreme_gates_span_6e4_inside_a_chunk():
    x = normalised(*inputs(128, **SHAPE, seed=1, extreme=True))
    assert max_chunk_span(x[3]) > 6e4  # the test inputs really are that extreme
    o_ref, s_ref = kda_recurrent_ref(*x)
    o, s = chunked(*x)
    assert rel_err(o, o_ref) <= TOL and rel_err(s, s_ref) <= TOL


def test_chunked_long_sequence_small_heads():
    x = normalised(*inputs(1100, B=1, H=2, Dk=16, Dv=12, seed=5, extreme=True))
    o_ref, s_ref = kda_recurrent_ref(*x)
    o, s = chunked(*x)
    assert rel_err(o, o_ref) <= TOL and rel_err(s, s_ref) <= TOL


@pytest.mark.parametrize("extreme", [False, True], ids=["gates", "extreme-gates"])
@pytest.mark.parametrize("T,shape", [(65, SHAPE), (130, SHAPE), (1100, dict(B=1, H=2, Dk=16, Dv=12))], ids=["65", "130", "1100"])
@pytest.mark.parametrize("scan", ["affine", "doubling"])
def test_affine_scan_matches_reference(scan, T, shape, extreme):
    """The scan across chunks as affine maps, one addmm a chunk in order (scan_affine) or combined in log2(N)
    levels (scan_doubling: 1100 tokens are 18 chunks, so levels of odd length too), against the recurrence."""
    x = normalised(*inputs(T, **shape, seed=T + 3, extreme=extreme))
    o_ref, s_ref = kda_recurrent_ref(*x)
    o, s = chunked(*x, scan=scan)
    assert rel_err(o, o_ref) <= TOL and rel_err(s, s_ref) <= TOL


def test_scan_choice_from_environment(monkeypatch):
    monkeypatch.delenv(kda_ops.SCAN_ENV, raising=False)
    gpu_scan = "affine" if kda_ops.gpu_backend() == "cuda" else "kernel"
    assert kda_ops.scan_path("chunked") == "ops" and kda_ops.scan_path("kernel") == gpu_scan
    monkeypatch.setenv(kda_ops.SCAN_ENV, "affine")
    assert kda_ops.scan_path("chunked") == kda_ops.scan_path("kernel") == "affine"
    monkeypatch.setenv(kda_ops.SCAN_ENV, "kernel")
    with pytest.raises(ConfigError, match="KIMI_MLX_KDA_SCAN=kernel needs"):
        kda_ops.scan_path("chunked")
    monkeypatch.setenv(kda_ops.SCAN_ENV, "fast")
    with pytest.raises(ConfigError, match="KIMI_MLX_KDA_SCAN"):
        kda_ops.scan_path("kernel")


def test_chunked_segments_carry_state(monkeypatch):
    monkeypatch.setattr(kda_chunked, "SEGMENT", 128)
    x = normalised(*inputs(300, B=1, H=2, Dk=24, Dv=8, seed=6))
    o_ref, s_ref = kda_recurrent_ref(*x)
    o, s = chunked(*x)
    assert rel_err(o, o_ref) <= TOL and rel_err(s, s_ref) <= TOL


def test_batch_of_two_with_different_lengths():
    """Sequence 0 runs 100 tokens, sequence 1 runs 37: separate calls, ragged tails, then continue."""
    q, k, v, g, beta, state = normalised(*inputs(100, **SHAPE, seed=7, extreme=True))
    for i, length in enumerate((100, 37)):
        part = lambda x: x[i : i + 1, :length]  # noqa: E731
        args = [part(x) for x in (q, k, v, g, beta)]
        o_ref, s_ref = kda_recurrent_ref(*args, state[i : i + 1])
        o1, s1 = chunked(*[a[:, :20] for a in args], state[i : i + 1])
        o2, s2 = chunked(*[a[:, 20:] for a in args], s1)
        assert rel_err(mx.concatenate([o1, o2], axis=1), o_ref) <= TOL
        assert rel_err(s2, s_ref) <= TOL


def test_unit_triangular_inverse():
    mx.random.seed(8)
    q, k, _, g, beta, _ = normalised(*inputs(64, B=1, H=2, Dk=16, Dv=8, seed=8))
    to = lambda x: x.transpose(0, 2, 1, *range(3, x.ndim))  # noqa: E731
    a_qk, t_inv = kda_chunked.intra_chunk(to(q), to(k), mx.exp(to(g)), to(beta))
    eye = np.eye(64, dtype=np.float32)
    lower = np.tril(np.ones((64, 64), np.float32), -1)
    # rebuild A_kk directly (small, exact decays from cumulative sums are fine at these gates)
    G = np.cumsum(np.array(to(g)), axis=-2)
    kk = np.array(to(k))
    decay = np.exp(np.minimum(G[..., :, None, :] - G[..., None, :, :], 0.0))
    a_kk = np.einsum("bhid,bhjd,bhijd->bhij", kk, kk, decay) * lower * np.array(to(beta))[..., None]
    assert np.abs(np.array(t_inv) @ (eye + a_kk) - eye).max() < 1e-5
    assert np.abs(np.triu(np.array(a_qk), 1)).max() == 0.0


# -- fused decode step --------------------------------------------------------------------------

def step_inputs(B, H, Dk, Dv, seed, dtype=mx.float32, extreme=True, random_state=True, K=4):
    mx.random.seed(seed)
    C3 = 2 * H * Dk + H * Dv
    a, a_log = gate_inputs((B, H, Dk), extreme)
    return dict(
        qkv=mx.random.normal((B, C3)).astype(dtype),
        gate_a=a.reshape(B, H * Dk).astype(dtype),
        beta_logit=mx.random.normal((B, H)).astype(dtype),
        conv_tail=mx.random.normal((B, K - 1, C3)).astype(dtype),
        conv_w=(0.5 * mx.random.normal((K, C3))).astype(dtype),
        a_log=a_log,
        dt_bias=mx.random.normal((H * Dk,)),
        state=mx.random.normal((B, H, Dv, Dk)) if random_state else mx.zeros((B, H, Dv, Dk)),
        gate_b=(12 * mx.random.normal((B, H * Dv))).astype(dtype),  # far into both tails of the sigmoid
        norm_w=mx.random.uniform(0.5, 1.5, (Dv,)),
        eps=1e-5,
    )


def assert_step_close(got, want, tol=TOL):
    """The gated output in its dtype (bfloat16: within its rounding), the state in float32, the tail exact."""
    y, s, tail = got
    y_ref, s_ref, tail_ref = want
    assert y.dtype == y_ref.dtype
    assert rel_err(y, y_ref) <= (tol if y.dtype == mx.float32 else 1e-2)
    assert rel_err(s, s_ref) <= tol
    assert tail.dtype == tail_ref.dtype and rel_err(tail, tail_ref) == 0.0


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("random_state", [False, True], ids=["zero-state", "random-state"])
def test_decode_ops_matches_reference(random_state, dtype):
    x = step_inputs(2, 3, 64, 24, seed=10, dtype=dtype, random_state=random_state)
    assert_step_close(decode_step_ops(**x), decode_step_ref(**x))


def test_decode_reference_matches_model_pieces():
    """The fused contract equals the unfused layer math: conv, then the recurrence on T = 1."""
    from kimi_mlx.model.kda import short_conv

    x = step_inputs(2, 3, 32, 24, seed=11)
    H, Dk, Dv = 3, 32, 24
    y, tail = short_conv(x["qkv"][:, None], x["conv_tail"], x["conv_w"])
    q, k, v = mx.split(y, [H * Dk, 2 * H * Dk], axis=-1)
    g = -mx.exp(x["a_log"])[:, None] * kda_ops.softplus((x["gate_a"] + x["dt_bias"]).reshape(2, 1, H, Dk))
    beta = mx.sigmoid(x["beta_logit"])[:, None]
    o, s = kda_ops.kda(q.reshape(2, 1, H, Dk), k.reshape(2, 1, H, Dk), v.reshape(2, 1, H, Dv), g, beta, x["state"])
    y = kda_ops.gated_norm_ref(o[:, 0], x["gate_b"].reshape(2, H, Dv), x["norm_w"], x["eps"], mx.float32)
    assert_step_close(decode_step_ref(**x), (y, s, tail))


@pytest.mark.skipif(not kernel_emulator.available(), reason="g++ is not installed")
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("Dv", [16, 96])
@pytest.mark.parametrize("kind", ["metal", "cuda"])
def test_decode_kernel_text_runs_right_on_cpu(kind, dtype, Dv):
    """The generated Metal and CUDA text of the decode kernel, run on the CPU by an emulator: one value row a
    32-lane group (Dv 16) and six (Dv 96); 16 groups meet in threadgroup memory for the norm."""
    from kimi_mlx.ops.kda_decode import groups

    B, H, Dk, K = 2, 3, 64, 4
    x = step_inputs(B, H, Dk, Dv, seed=12, dtype=dtype)
    names = ["qkv", "conv_tail", "conv_w", "gate_a", "dt_bias", "a_log", "state", "beta_logit", "gate_b", "norm_w"]
    G = groups(Dv)
    got = kernel_emulator.emulate(
        "kda_decode", kind, [x[n] for n in names] + [mx.array([x["eps"]], mx.float32)],
        (("NH", H), ("DK", Dk), ("DV", Dv), ("KW", K), ("G", G)),
        grid=(32 * G, 1, B * H), threadgroup=(32 * G, 1, 1),
        output_shapes=[(B, H, Dv), (B, H, Dv, Dk), (B, K - 1, x["qkv"].shape[1])],
        output_dtypes=[dtype, mx.float32, dtype],
    )
    assert_step_close(got, decode_step_ref(**x))


def gates_step_inputs(B, H, Dk, Dv, bits, seed, dtype=mx.float32):
    """decode_step_gates_* arguments: step_inputs with the fused low-rank row and quantized f_b, g_b."""
    import mlx.nn as nn

    x = step_inputs(B, H, Dk, Dv, seed, dtype=dtype)
    f_b = nn.QuantizedLinear(Dk, H * Dk, bias=False, group_size=64, bits=bits)
    g_b = nn.QuantizedLinear(Dk, H * Dv, bias=False, group_size=64, bits=bits)
    for m in (f_b, g_b):
        m.set_dtype(dtype)
    gates = mx.concatenate([4 * mx.random.normal((B, 2 * Dk)), 3 * mx.random.normal((B, H))], axis=1).astype(dtype)
    keep = ("qkv", "conv_tail", "conv_w", "a_log", "dt_bias", "state", "norm_w", "eps")
    return dict({k: x[k] for k in keep}, gates=gates, f_b=f_b, g_b=g_b)


def exact(m):
    """A quantized projection applied in float32 and rounded once to its input's dtype (what the kernel does;
    MLX's bfloat16 quantized matmul on the CPU is ~1% off it). v: [B, in]."""
    w = mx.dequantize(m.weight, m.scales, m.biases, group_size=m.group_size, bits=m.bits).astype(mx.float32)
    return lambda v: (v.astype(mx.float32)[:, None, :] * w).sum(-1).astype(v.dtype)  # no matmul: no TF32 on CUDA


def gates_reference(x):
    from kimi_mlx.ops import kda_decode

    return kda_decode.decode_step_gates_ref(**dict(x, f_b=exact(x["f_b"]), g_b=exact(x["g_b"])))


def test_decode_gates_kernel_refuses_groups_that_do_not_split_dk():
    """Dv = 24 takes 12 lane groups (kda_decode.groups), which split Dv's rows but not Dk = 64 of f_b's: the
    kernel's rows-per-group split needs both (a static_assert in its text), so the layer takes another path."""
    from kimi_mlx.ops import kda_decode

    assert kda_decode.groups(24) == 12
    x = gates_step_inputs(1, 2, 64, 24, 8, seed=3)
    assert not kda_decode.gates_kernel_supports(x["f_b"], x["g_b"], x["state"])
    y = gates_step_inputs(1, 2, 64, 32, 8, seed=3)
    assert kda_decode.gates_kernel_supports(y["f_b"], y["g_b"], y["state"])


@pytest.mark.skipif(not kernel_emulator.available(), reason="g++ is not installed")
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("bits,Dv", [(8, 16), (4, 96)])
@pytest.mark.parametrize("kind", ["metal", "cuda"])
def test_decode_gates_kernel_text_runs_right_on_cpu(kind, bits, Dv, dtype, monkeypatch):
    """The decode kernel that applies f_b and g_b itself (generated text, emulated; through its ops wrapper)
    against the projections in float32, each rounded once to the gates' dtype, and the reference step."""
    import metal_kernels
    from kimi_mlx.ops import kda_decode

    monkeypatch.setattr(metal_kernels, "kernel", kernel_emulator.kernel_factory(kind))
    x = gates_step_inputs(2, 3, 64, Dv, bits, seed=16, dtype=dtype)
    assert kda_decode.gates_kernel_supports(x["f_b"], x["g_b"], x["state"])
    # bfloat16: a projection's sum in another order can round to the neighbouring bfloat16 value, and a forget
    # gate one unit off moves its state row (the float32 cases hold the kernel to TOL)
    tol = TOL if dtype == mx.float32 else 2e-2
    assert_step_close(kda_decode.decode_step_gates_kernel(**x), gates_reference(x), tol)


@pytest.mark.skipif(not kernel_emulator.available(), reason="g++ is not installed")
@pytest.mark.parametrize("rows", [1, 3, 4])
@pytest.mark.parametrize("kind", ["metal", "cuda"])
def test_chunk_scan_kernel_text_runs_right_on_cpu(kind, rows):
    """The generated text of the scan-across-chunks kernel, run on the CPU, against `scan_ops`."""
    N, B, H, C, Dk, Dv = 2, 2, 3, 8, 64, 12
    mx.random.seed(14)
    w, q_in, k_out = (0.1 * mx.random.normal((N, B, H, C, Dk)) for _ in range(3))
    u = mx.random.normal((N, B, H, C, Dv))
    decay_all = mx.random.uniform(shape=(N, B, H, Dk))
    state = mx.random.normal((B, H, Dv, Dk))
    got = kernel_emulator.emulate(
        "kda_chunk_scan", kind, [w, u, q_in, k_out, decay_all, state, mx.array([N, B], dtype=mx.int32)],
        (("NH", H), ("DK", Dk), ("DV", Dv), ("C", C), ("R", rows)), grid=(32, Dv // rows, B * H),
        threadgroup=(32, 1, 1),
        output_shapes=[u.shape, u.shape, state.shape], output_dtypes=[mx.float32] * 3,
    )
    for g, want in zip(got, kda_chunked.scan_ops(w, u, q_in, k_out, decay_all, state)):
        assert rel_err(g, want) <= TOL


@pytest.mark.skipif(not kernel_emulator.available(), reason="g++ is not installed")
@pytest.mark.parametrize("Dk", [48, 64])
@pytest.mark.parametrize("kind", ["metal", "cuda"])
def test_scan_mma_kernel_text_runs_right_on_cpu(kind, Dk, monkeypatch):
    """The generated text of the affine scan on the matrix units (its tile helpers emulated), run on the CPU
    through scan_mma, against `scan_ops`: Dk 48 leaves a 32-lane group without a tile, Dk 64 has two slices."""
    N, B, H, C, Dv = 3, 2, 2, 8, 32
    mx.random.seed(15)
    w, q_in, k_out = (0.1 * mx.random.normal((N, B, H, C, Dk)) for _ in range(3))
    u = mx.random.normal((N, B, H, C, Dv))
    decay_all = mx.random.uniform(shape=(N, B, H, Dk))
    state = mx.random.normal((B, H, Dv, Dk))
    monkeypatch.setattr("metal_kernels.kernel", kernel_emulator.kernel_factory(kind))
    got = kda_chunked.scan_mma(w, u, q_in, k_out, decay_all, state)
    for g, want in zip(got, kda_chunked.scan_ops(w, u, q_in, k_out, decay_all, state)):
        assert rel_err(g, want) <= TOL


@pytest.mark.skipif(not kernel_emulator.available(), reason="g++ is not installed")
@pytest.mark.parametrize("kind", ["metal", "cuda"])
def test_chunked_prefill_on_the_matrix_unit_kernels_runs_right_on_cpu(kind, monkeypatch):
    """The whole chunked prefill with both matrix-unit kernels (per-chunk matrices and scan, their generated text
    emulated) against the recurrence: extreme gates, a ragged last chunk, a random starting state."""
    x = normalised(*inputs(130, B=1, H=2, Dk=32, Dv=16, seed=16, extreme=True))
    monkeypatch.setattr("metal_kernels.kernel", kernel_emulator.kernel_factory(kind))
    o_ref, s_ref = kda_recurrent_ref(*x)
    o, s = chunked(*x, use_kernel=True, scan="mma", intra="mma")
    assert rel_err(o, o_ref) <= TOL and rel_err(s, s_ref) <= TOL


# -- the dispatcher -----------------------------------------------------------------------------

def test_mode_from_environment(monkeypatch):
    monkeypatch.setenv(kda_ops.ENV, "ref")
    assert kda_ops.prefill_path(500) == "ref"
    monkeypatch.setenv(kda_ops.ENV, "chunked")
    assert kda_ops.prefill_path(2) == "chunked" and kda_ops.prefill_path(1) == "ref"
    monkeypatch.setenv(kda_ops.ENV, "auto")
    fast = "kernel" if kda_ops.gpu_backend() else "chunked"
    assert kda_ops.prefill_path(kda_ops.CHUNKED_MIN_T) == fast
    assert kda_ops.prefill_path(kda_ops.CHUNKED_MIN_T, dk=40) == "chunked"
    assert kda_ops.prefill_path(kda_ops.CHUNKED_MIN_T - 1) == "ref"
    monkeypatch.setenv(kda_ops.ENV, "fast")
    with pytest.raises(ConfigError, match="KIMI_MLX_KDA"):
        kda_ops.mode()


@pytest.mark.skipif(kda_ops.gpu_backend() is not None, reason="checks the no-GPU refusal")
def test_kernel_mode_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(kda_ops.ENV, "kernel")
    with pytest.raises(ConfigError, match="Metal or CUDA"):
        kda_decode.decode_path(mx.zeros((1, 2, 32, 32)), mx.zeros((4, 8)))
    with pytest.raises(ConfigError, match="Metal or CUDA"):
        kda_ops.prefill_path(100)


def test_doctor_checks_every_path(monkeypatch):
    from typer.testing import CliRunner

    from kimi_mlx.cli import app

    monkeypatch.delenv(kda_ops.ENV, raising=False)
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "chunked prefill" in result.output and "decode step, fused ops" in result.output
    broken = lambda q, k, v, g, beta, state, **kw: (v.astype(mx.float32) * 0, state)  # noqa: E731
    monkeypatch.setattr(kda_chunked, "kda_chunked", broken)
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 1 and "FAIL  chunked prefill" in result.output


def test_doctor_reports_a_kernel_that_fails_to_build_as_a_failed_check(monkeypatch):
    from kimi_mlx import doctor

    def broken():
        raise RuntimeError("[custom_kernel] Failed to compile kernel: error: identifier undefined\nmore")

    c = doctor._guarded("KDA per-chunk matrices, kernel", broken)
    assert not c.ok and "Failed to compile kernel" in c.note and "\n" not in c.note
    lines = []

    def run_checks(each=None):  # the doctor's one check: the broken one, its line printed as it ends
        each(c)
        return [c]

    monkeypatch.setattr(doctor, "run_checks", run_checks)
    assert doctor.main(lines.append) is False
    assert any(line.startswith("  FAIL  KDA per-chunk matrices") and "Failed to compile" in line for line in lines)


# -- a tiny model: every path gives the same logits ---------------------------------------------

def tiny_model(seed=0):
    cfg = ModelConfig.from_dict(dict(
        model_type="kimi_linear", vocab_size=97, hidden_size=48, num_hidden_layers=2, intermediate_size=64,
        linear_attn_config=dict(num_heads=2, head_dim=32, short_conv_kernel_size=4, kda_layers=[1, 2],
                                full_attn_layers=[]),
    ))
    mx.random.seed(seed)
    model = Model(cfg)
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.conv_weight = 0.5 * mx.random.normal(attn.conv_weight.shape)
        attn.A_log = mx.random.uniform(0.0, math.log(16.0), attn.A_log.shape)
        attn.dt_bias = mx.random.uniform(-2.0, 8.0, attn.dt_bias.shape)
    return model


def prefill_then_decode(model, tokens, n_decode):
    state = model.new_state(tokens.shape[0])
    out = [model(tokens[:, :-n_decode], state)]
    out += [model(tokens[:, t : t + 1], state) for t in range(tokens.shape[1] - n_decode, tokens.shape[1])]
    return mx.concatenate(out, axis=1)


def paths_agree(model, monkeypatch, modes):
    tokens = mx.array(np.random.default_rng(0).integers(0, 97, (2, 75)))
    monkeypatch.setenv(kda_ops.ENV, "ref")
    want = prefill_then_decode(model, tokens, 5)
    for m in modes:
        monkeypatch.setenv(kda_ops.ENV, m)
        assert rel_err(prefill_then_decode(model, tokens, 5), want) <= TOL, m


def test_model_paths_agree(monkeypatch):
    paths_agree(tiny_model(), monkeypatch, ["chunked", "auto"])


# -- on the GPU (device machine) ----------------------------------------------------------------

gpu = pytest.mark.skipif(kda_ops.gpu_backend() is None, reason="needs MLX's Metal or CUDA backend")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("extreme", [False, True], ids=["gates", "extreme-gates"])
@pytest.mark.parametrize("T", [1, 2, 63, 64, 65, 1100])
@pytest.mark.parametrize("use_kernel,scan,intra", [(False, None, "kernel"), (True, None, "kernel"),
                                                   (True, "affine", "kernel"), (True, "doubling", "mma"),
                                                   (True, "mma", "mma")],
                         ids=["ops", "scan-kernel", "scan-affine", "doubling-mma", "mma-mma"])
def test_gpu_chunked_matches_reference(use_kernel, scan, intra, T, extreme, dtype):
    shape = dict(SHAPE, Dk=64)  # the scan kernel needs Dk % 32 == 0
    x = normalised(*inputs(T, **shape, seed=T, extreme=extreme, dtype=dtype, random_state=T % 2 == 0))
    o_ref, s_ref = kda_recurrent_ref(*x)
    o, s = chunked(*x, use_kernel=use_kernel, scan=scan, intra=intra)
    assert rel_err(o, o_ref) <= TOL and rel_err(s, s_ref) <= TOL


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("extreme", [False, True], ids=["gates", "extreme-gates"])
@pytest.mark.parametrize("intra", kda_chunked.INTRAS)
def test_gpu_intra_chunk_kernel_model_shape(intra, extreme):
    mx.random.seed(22)
    q, k = (0.1 * mx.random.normal((8, 32, 64, 128)) for _ in range(2))
    g = -mx.abs(mx.random.normal((8, 32, 64, 128))) * (mx.where(mx.random.uniform(shape=(8, 32, 64, 1)) < 0.1, 500.0, 0.2)
                                                        if extreme else 0.2)
    beta = mx.random.uniform(shape=(8, 32, 64))
    got = kda_chunked.intra_chunk_kernel(q, k, g, beta, intra)
    for a, b in zip(got, kda_chunked.intra_chunk(q, k, mx.exp(g), beta)):
        assert rel_err(a, b) <= TOL


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("scan,intra", [("kernel", "kernel"), ("affine", "kernel"), ("doubling", "mma"),
                                        ("mma", "mma")])
def test_gpu_scan_model_shape(scan, intra):
    x = normalised(*inputs(300, B=1, H=32, Dk=128, Dv=128, seed=15, extreme=True))
    o_ref, s_ref = chunked(*x)
    o, s = chunked(*x, use_kernel=True, scan=scan, intra=intra)
    assert rel_err(o, o_ref) <= TOL and rel_err(s, s_ref) <= TOL


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 3, 64, 24), (2, 32, 128, 128)], ids=["small", "model"])
@pytest.mark.parametrize("random_state", [False, True], ids=["zero-state", "random-state"])
def test_gpu_decode_kernel_matches_reference(shape, random_state, dtype):
    x = step_inputs(*shape, seed=13, dtype=dtype, random_state=random_state)
    assert_step_close(decode_step_kernel(**x), decode_step_ref(**x))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_gpu_decode_gates_kernel_matches_reference(bits):
    from kimi_mlx.ops import kda_decode

    x = gates_step_inputs(1, 32, 128, 128, bits, seed=17, dtype=mx.bfloat16)
    assert_step_close(kda_decode.decode_step_gates_kernel(**x), gates_reference(x), 2e-2)  # as the CPU test's
    x = gates_step_inputs(1, 32, 128, 128, bits, seed=18)
    assert_step_close(kda_decode.decode_step_gates_kernel(**x), gates_reference(x))


@pytest.mark.gpu
@gpu
def test_gpu_model_paths_agree(monkeypatch):
    paths_agree(tiny_model(), monkeypatch, ["chunked", "kernel", "auto"])


@pytest.mark.skipif(not kernel_emulator.available(), reason="g++ is not installed")
def test_emulator_fails_a_kernel_that_does_not_finish(monkeypatch):
    monkeypatch.setattr(kernel_emulator, "TIMEOUT_S", 0)
    q = mx.zeros((2, 64, 96))  # an instantiation no other test uses: its group memory is its own
    try:
        with pytest.raises(RuntimeError, match="did not finish"):
            kernel_emulator.emulate("kda_intra_chunk", "cuda", [q, q, q, mx.zeros((2, 64))], (("DK", 96), ("C", 64)),
                                    grid=(256, 2, 1), threadgroup=(256, 1, 1), output_shapes=[(2, 64, 64)] * 2,
                                    output_dtypes=[mx.float32] * 2)
    finally:
        kernel_emulator.last_run.join()


@pytest.mark.skipif(not kernel_emulator.available(), reason="g++ is not installed")
@pytest.mark.parametrize("extreme", [False, True], ids=["gates", "extreme-gates"])
@pytest.mark.parametrize("C", [16, 64])
@pytest.mark.parametrize("kind", ["metal", "cuda"])
@pytest.mark.parametrize("name", ["kda_intra_chunk", "kda_intra_chunk_mma"])
def test_intra_chunk_kernel_text_runs_right_on_cpu(name, kind, extreme, C):
    """The generated text of the per-chunk matrices kernels (products on the CUDA / simdgroup cores, or on the
    matrix units: their fragment helpers emulated), run on the CPU, against `intra_chunk`."""
    M, Dk = 2, 32
    mx.random.seed(21)
    q, k = (0.3 * mx.random.normal((M, C, Dk)) for _ in range(2))
    scale = 200.0 if extreme else 1.0  # extreme: single rows with decays of e^-600 beside rows near 1
    g = -mx.abs(mx.random.normal((M, C, Dk))) * mx.where(mx.random.uniform(shape=(M, C, 1)) < 0.2, scale, 0.3)
    beta = mx.random.uniform(shape=(M, C))
    got = kernel_emulator.emulate(
        name, kind, [q, k, g, beta], (("DK", Dk), ("C", C)), grid=(256, M, 1),
        threadgroup=(256, 1, 1), output_shapes=[(M, C, C)] * 2, output_dtypes=[mx.float32] * 2,
    )
    for g_, want in zip(got, kda_chunked.intra_chunk(q, k, mx.exp(g), beta)):
        assert rel_err(g_, want) <= TOL



# -- the output gate (rms_norm x sigmoid gate, cast) ----------------------------------------------


@pytest.mark.skipif(not kernel_emulator.available(), reason="g++ is not installed")
@pytest.mark.parametrize("kind", ["metal", "cuda"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_gated_norm_kernel_text_runs_right_on_cpu(kind, dtype):
    """Rows of tiny and huge scale, gates far into both tails of the sigmoid."""
    from kimi_mlx.ops import kda as K
    from metal_kernels import group_rows

    rng = np.random.default_rng(5)
    rows, D = 6, 64
    o = mx.array(rng.standard_normal((2, 3, D)).astype(np.float32) * np.array([1e-3, 1, 1e3])[None, :, None])
    gate = mx.array(rng.standard_normal((2, 3, D)).astype(np.float32) * 12).astype(dtype)
    w = mx.array(rng.uniform(0.5, 1.5, D).astype(np.float32))
    (got,) = kernel_emulator.emulate("kda_gated_norm", kind, [o, gate, w, mx.array([1e-5], mx.float32)],
                                     (("D", D),), grid=(32 * rows, 1, 1), threadgroup=(32 * group_rows(rows, 4), 1, 1),
                                     output_shapes=[o.shape], output_dtypes=[dtype])
    ref = K.gated_norm_ref(o, gate, w, 1e-5, dtype)
    tol = 1e-5 if dtype == mx.float32 else 1e-2
    assert float(mx.abs(got.astype(mx.float32) - ref.astype(mx.float32)).max()) <= tol * float(mx.abs(ref.astype(mx.float32)).max())


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 300])
def test_gated_norm_kernel_on_gpu(T):
    from kimi_mlx.ops import kda as K

    mx.random.seed(T)
    o = mx.random.normal((2, T, 32, 128)) * 5
    gate = (mx.random.normal((2, T, 32, 128)) * 6).astype(mx.bfloat16)
    w = mx.random.uniform(0.5, 1.5, (128,))
    got, ref = K.gated_norm_kernel(o, gate, w, 1e-5, mx.bfloat16), K.gated_norm_ref(o, gate, w, 1e-5, mx.bfloat16)
    assert got.dtype == mx.bfloat16
    assert float(mx.abs(got.astype(mx.float32) - ref.astype(mx.float32)).max()) <= 1e-2 * float(mx.abs(ref.astype(mx.float32)).max())


@pytest.mark.gpu
def test_doctor_gate_and_cache_row_checks_on_gpu():
    from kimi_mlx import doctor

    assert doctor.check_gated_norm().ok and doctor.check_cache_rows().ok


def test_doctor_prints_each_check_as_it_ends(monkeypatch):
    """A check that compiles for a minute on a GPU must not hold back the lines of the checks before it."""
    from kimi_mlx import doctor

    lines = []

    def first(_=None):
        return doctor.Check("chunked prefill, ops", 0.0)

    def second(_=None):
        assert any("chunked prefill, ops" in line for line in lines), lines  # the first check's line is out
        return doctor.Check("decode step, fused ops", 0.0)

    monkeypatch.setattr(doctor, "check_chunked", first)
    monkeypatch.setattr(doctor, "check_decode", second)
    monkeypatch.setattr(doctor, "GPU_CHECKS", {})
    assert doctor.main(lines.append) is True
    assert [line.split(":")[0].strip() for line in lines if line.startswith("  ok")] == [
        "ok    chunked prefill, ops", "ok    decode step, fused ops"]
