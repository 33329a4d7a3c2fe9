"""One KDA decode step (T = 1), fused: conv-state update + SiLU, q/k L2 norms, forget gate, beta,
delta-rule state update, readout and the output gate (rms_norm x sigmoid gate).

Three twins with one contract:
  decode_step_ref     plain mx ops, float32, built from the sequential pieces (the reference)
  decode_step_ops     compiled conv/norm/gate ops, then the state update in three passes (CPU path)
  decode_step_kernel  one Metal or CUDA kernel per layer (metal_kernels/kda_decode.body)

Arguments (C3 = 2*H*Dk + H*Dv channels, q|k|v):
  qkv [B, C3] pre-conv projections of the token; gate_a [B, H*Dk] f_b(f_a(x)) before dt_bias;
  beta_logit [B, H] b_proj(x); conv_tail [B, K-1, C3] previous pre-conv inputs; conv_w [K, C3]
  (row K-1 multiplies the current token); a_log [H]; dt_bias [H*Dk]; state [B, H, Dv, Dk] f32;
  gate_b [B, H*Dv] g_b(g_a(x)); norm_w [Dv] the output norm's weight; eps its epsilon.
Returns (y [B, H, Dv] in qkv's dtype: ops.kda.gated_norm of the readout, new state [B, H, Dv, Dk] f32,
new conv_tail [B, K-1, C3] in qkv's dtype).

From the fused low-rank row instead (gates [B, 2*Dk + H] = f_a | g_a | beta logits, and the f_b_proj and
g_b_proj modules), two twins:
  decode_step_gates_ref     f_b and g_b as the modules' matmuls, then decode_step_ref
  decode_step_gates_kernel  one kernel that also applies f_b and g_b (affine-quantized at 2, 4 or 8 bits:
                            gates_kernel_supports), each threadgroup for its own head
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .. import settings
from ..errors import ConfigError
from . import kda as kda_ops
from .kda import gated_norm_ref, kda_recurrent_ref, l2_normalize, softplus


def _prepare(qkv, gate_a, beta_logit, conv_tail, conv_w, a_log, dt_bias, state):
    """Conv + SiLU, q/k norms and gates: (q, k, v [B, 1, H, D], g [B, 1, H, Dk], beta [B, 1, H], tail)."""
    B = qkv.shape[0]
    H = a_log.shape[0]
    Dv, Dk = state.shape[-2:]
    f32 = mx.float32
    window = mx.concatenate([conv_tail.astype(f32), qkv[:, None].astype(f32)], axis=1)  # [B, K, C3]
    y = nn.silu((window * conv_w.astype(f32)).sum(1))
    q, k, v = mx.split(y, [H * Dk, 2 * H * Dk], axis=-1)
    q = l2_normalize(q.reshape(B, 1, H, Dk)) * Dk**-0.5
    k = l2_normalize(k.reshape(B, 1, H, Dk))
    g = -mx.exp(a_log.astype(f32))[:, None] * softplus(
        (gate_a.astype(f32) + dt_bias.astype(f32)).reshape(B, 1, H, Dk)
    )
    beta = mx.sigmoid(beta_logit.astype(f32)).reshape(B, 1, H)
    tail = mx.concatenate([conv_tail[:, 1:], qkv[:, None]], axis=1).astype(qkv.dtype)
    return q, k, v.reshape(B, 1, H, Dv), g, beta, tail


def _gate_out(o, gate_b, norm_w, eps, dtype):
    """The readout o [B, H, Dv] f32 through the output gate, in dtype."""
    return gated_norm_ref(o, gate_b.reshape(o.shape), norm_w, eps, dtype)


def decode_step_ref(qkv, gate_a, beta_logit, conv_tail, conv_w, a_log, dt_bias, state, gate_b, norm_w, eps):
    q, k, v, g, beta, tail = _prepare(qkv, gate_a, beta_logit, conv_tail, conv_w, a_log, dt_bias, state)
    o, state = kda_recurrent_ref(q, k, v, g, beta, state)
    return _gate_out(o[:, 0], gate_b, norm_w, eps, qkv.dtype), state, tail


def _prepare_rows(qkv, gate_a, beta_logit, conv_tail, conv_w, a_log, dt_bias, state):
    """_prepare for T tokens at once, each row as _prepare computes it alone: (q, k, v [B, T, H, D],
    g [B, T, H, Dk], beta [B, T, H], the conv tail after each token [B, T, K-1, C3]). qkv [B, T, C3], gate_a
    [B, T, H*Dk], beta_logit [B, T, H]."""
    B, T, _ = qkv.shape
    H = a_log.shape[0]
    Dv, Dk = state.shape[-2:]
    K = conv_w.shape[0]
    f32 = mx.float32
    xx = mx.concatenate([conv_tail.astype(qkv.dtype), qkv], axis=1)  # [B, K-1+T, C3]
    windows = mx.stack([xx[:, t : t + K] for t in range(T)], axis=1)  # [B, T, K, C3]
    y = nn.silu((windows.astype(f32) * conv_w.astype(f32)).sum(2))
    q, k, v = mx.split(y, [H * Dk, 2 * H * Dk], axis=-1)
    q = l2_normalize(q.reshape(B, T, H, Dk)) * Dk**-0.5
    k = l2_normalize(k.reshape(B, T, H, Dk))
    g = -mx.exp(a_log.astype(f32))[:, None] * softplus(
        (gate_a.astype(f32) + dt_bias.astype(f32)).reshape(B, T, H, Dk)
    )
    beta = mx.sigmoid(beta_logit.astype(f32)).reshape(B, T, H)
    return q, k, v.reshape(B, T, H, Dv), g, beta, windows[:, :, 1:]


def decode_rows_ops(qkv, gate_a, beta_logit, conv_tail, conv_w, a_log, dt_bias, state, gate_b, norm_w, eps):
    """decode_step_ops over T tokens (arguments with a token axis after the batch: qkv [B, T, C3], gate_a,
    beta_logit, gate_b [B, T, ...]): the conv, norms and gates of all T at once, the state update token by
    token, the output gate over all T. Returns (y [B, T, H, Dv], [(conv_tail, state)] after each token); each
    row is decode_step_ops's for that token (tests/test_speculative.py compares them bit for bit)."""
    q, k, v, g, beta, tails = _prepare_rows_compiled(qkv, gate_a, beta_logit, conv_tail, conv_w, a_log, dt_bias,
                                                     state)
    outs, after = [], []
    for t in range(qkv.shape[1]):
        sl = slice(t, t + 1)
        o, state = _update(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], state)
        outs.append(o)
        after.append((tails[:, t], state))
    o = mx.stack(outs, axis=1)
    return _gate_out(o, gate_b, norm_w, eps, qkv.dtype), after


def _update(q, k, v, g, beta, state):
    """The step in three passes over the state: both reads use the old state,
    S (alpha * k) and S (alpha * q), then one fused write S * alpha + u k^T."""
    q, k, v, beta = q[:, 0], k[:, 0], v[:, 0].astype(mx.float32), beta[:, 0, :, None]
    alpha = mx.exp(g[:, 0])
    pred = (state * (alpha * k)[..., None, :]).sum(-1)
    u = beta * (v - pred)
    o = (state * (alpha * q)[..., None, :]).sum(-1) + u * (k * q).sum(-1, keepdims=True)
    return o, state * alpha[..., None, :] + u[..., None] * k[..., None, :]


_prepare_compiled = mx.compile(_prepare)  # small arrays only: the state never enters a compiled graph
_prepare_rows_compiled = mx.compile(_prepare_rows)


def decode_step_ops(qkv, gate_a, beta_logit, conv_tail, conv_w, a_log, dt_bias, state, gate_b, norm_w, eps):
    q, k, v, g, beta, tail = _prepare_compiled(qkv, gate_a, beta_logit, conv_tail, conv_w, a_log, dt_bias, state)
    o, state = _update(q, k, v, g, beta, state)
    return _gate_out(o, gate_b, norm_w, eps, qkv.dtype), state, tail


def shape_supported(state_shape: tuple, conv_taps: int) -> bool:
    """Shapes the kernel handles: whole 32-lane groups over Dk, at most 32 value rows a group (a lane stores
    each), and at least one conv tail row."""
    Dv, Dk = state_shape[-2:]
    return Dk % 32 == 0 and Dv <= 32 * groups(Dv) and conv_taps >= 2



def _as(x: mx.array, dtype: mx.Dtype) -> mx.array:
    return x if x.dtype == dtype else x.astype(dtype)  # a same-dtype astype would still copy


MAX_GROUPS = 16  # 512 threads a threadgroup: CUDA launches that many at up to 128 registers a thread; a Metal
#                 pipeline's limit depends on its registers (unmeasured here): load runs it once (Model.probe_kernels)


def groups(dv: int) -> int:
    """32-lane groups in the kernel's threadgroup (one per head): the most, up to MAX_GROUPS, splitting Dv evenly."""
    return next(g for g in range(min(MAX_GROUPS, dv), 0, -1) if dv % g == 0)


def _launch(name, qkv, gate_inputs, conv_tail, conv_w, a_log, dt_bias, state, norm_w, eps, template=()):
    """Run decode kernel `name` (kda_decode or kda_decode_gates): one threadgroup a (sequence, head)."""
    from metal_kernels import kernel

    B, C3 = qkv.shape
    H = a_log.shape[0]
    Dv, Dk = state.shape[-2:]
    K = conv_w.shape[0]
    G = groups(Dv)
    first, rest = gate_inputs
    return kernel(name)(
        inputs=[qkv, _as(conv_tail, qkv.dtype), conv_w, *first, dt_bias, a_log, _as(state, mx.float32), *rest,
                _as(norm_w, mx.float32), mx.array([eps], mx.float32)],
        template=[("NH", H), ("DK", Dk), ("DV", Dv), ("KW", K), ("G", G), *template],
        grid=(32 * G, 1, B * H),
        threadgroup=(32 * G, 1, 1),
        output_shapes=[(B, H, Dv), (B, H, Dv, Dk), (B, K - 1, C3)],
        output_dtypes=[qkv.dtype, mx.float32, qkv.dtype],
    )


def decode_step_kernel(qkv, gate_a, beta_logit, conv_tail, conv_w, a_log, dt_bias, state, gate_b, norm_w, eps):
    return _launch("kda_decode", qkv, ([gate_a], [beta_logit, gate_b]), conv_tail, conv_w, a_log, dt_bias, state,
                   norm_w, eps)


def decode_rows_kernel(qkv, gate_a, beta_logit, conv_tail, conv_w, a_log, dt_bias, state, gate_b, norm_w, eps):
    """decode_rows_ops's contract (qkv [B, T, C3], gate_a, beta_logit, gate_b [B, T, ...]) as one kernel launch
    for all T tokens (metal_kernels/kda_decode_rows.body: kda_decode's step token after token, the state kept in
    registers): (y [B, T, H, Dv], [(conv_tail, state)] after each token)."""
    from metal_kernels import kernel

    B, T, C3 = qkv.shape
    H = a_log.shape[0]
    Dv, Dk = state.shape[-2:]
    K = conv_w.shape[0]
    G = groups(Dv)
    y, states, tails = kernel("kda_decode_rows")(
        inputs=[qkv, _as(conv_tail, qkv.dtype), conv_w, gate_a, dt_bias, a_log, _as(state, mx.float32), beta_logit,
                gate_b, _as(norm_w, mx.float32), mx.array([eps], mx.float32)],
        template=[("NH", H), ("DK", Dk), ("DV", Dv), ("KW", K), ("G", G), ("NT", T)],
        grid=(32 * G, 1, B * H),
        threadgroup=(32 * G, 1, 1),
        output_shapes=[(B, T, H, Dv), (B, T, H, Dv, Dk), (B, T, K - 1, C3)],
        output_dtypes=[qkv.dtype, mx.float32, qkv.dtype],
    )
    return y, [(tails[:, t], states[:, t]) for t in range(T)]


def decode_step_gates_ref(qkv, gates, conv_tail, conv_w, a_log, dt_bias, state, f_b, g_b, norm_w, eps):
    D = state.shape[-1]
    return decode_step_ref(qkv, f_b(gates[:, :D]), gates[:, 2 * D :], conv_tail, conv_w, a_log, dt_bias, state,
                           g_b(gates[:, D : 2 * D]), norm_w, eps)


def gates_kernel_misfit(f_b, g_b, state: mx.array) -> str | None:
    """Why decode_step_gates_kernel cannot apply these f_b and g_b, or None (gates_kernel_supports's conditions)."""
    if gates_kernel_supports(f_b, g_b, state):
        return None
    if not all(isinstance(m, nn.QuantizedLinear) for m in (f_b, g_b)):
        return "f_b / g_b are unquantized"
    return (f"f_b {f_b.bits}-bit {getattr(f_b, 'mode', 'affine')} gs{f_b.group_size}, g_b {g_b.bits}-bit "
            f"{getattr(g_b, 'mode', 'affine')} gs{g_b.group_size} (the kernel reads both affine 2/4/8-bit alike)")


def gates_kernel_supports(f_b, g_b, state: mx.array) -> bool:
    """f_b and g_b affine-quantized alike at 2, 4 or 8 bits (MLX packs those whole in 32-bit words), with
    groups splitting a row of Dk values, and the threadgroup's 32-lane groups splitting f_b's Dk rows as they
    split g_b's Dv (the kernel path's own conditions: shape_supported)."""
    Dv, Dk = state.shape[-2:]
    mods = (f_b, g_b)
    if not all(isinstance(m, nn.QuantizedLinear) and getattr(m, "mode", "affine") == "affine" for m in mods):
        return False
    bits, gs = f_b.bits, f_b.group_size
    return (g_b.bits, g_b.group_size) == (bits, gs) and bits in (2, 4, 8) and Dk % gs == 0 and "biases" in f_b \
        and "biases" in g_b and Dk % groups(Dv) == 0


def decode_step_gates_kernel(qkv, gates, conv_tail, conv_w, a_log, dt_bias, state, f_b, g_b, norm_w, eps):
    quantized = [m[k] for m in (f_b, g_b) for k in ("weight", "scales", "biases")]
    return _launch("kda_decode_gates", qkv, ([gates], quantized), conv_tail, conv_w, a_log, dt_bias, state,
                   norm_w, eps, template=[("BITS", f_b.bits), ("GS", f_b.group_size)])


def choose_decode(f, state_shape: tuple, conv_taps: int) -> str:
    """'ref' (the model's unfused layer), 'ops' or 'kernel' for one fused decode step over a recurrent state of
    state_shape [..., Dv, Dk] and a conv of conv_taps (f: settings.Facts)."""
    m = f[kda_ops.ENV]
    if m == "ref":
        return "ref"
    fits = shape_supported(state_shape, conv_taps)
    if m == "kernel":
        kda_ops._require_kernels(f.gpu, state_shape[-1])
        if not fits:
            raise ConfigError(f"{kda_ops.ENV}=kernel: the decode kernel needs a short conv of 2+ taps")
        return "kernel"
    if m == "auto" and f.gpu and fits:
        return "kernel"
    return "ops"


ROWS_ENV = "KIMI_MLX_KDA_ROWS"
# From this many tokens one kda_decode_rows launch measured faster than the decode kernel launched once a token;
# at 3 tokens it measured slower (benchmarks/speculative.py --rows-kernel, RESULTS.md)
ROWS_FROM = 5


def choose_rows(f, state_shape: tuple, conv_taps: int, tokens: int) -> str:
    """How a verification's KDA steps over `tokens` tokens run on the decode kernel path (f: settings.Facts):
    'rows' (one kda_decode_rows launch for all of them) on a GPU, the kernel not switched off and the shapes the
    decode kernel's, from ROWS_FROM tokens (KIMI_MLX_KDA_ROWS=auto) or at every width (on); else 'steps' (the
    decode kernel once a token)."""
    fits = f.gpu is not None and f.usable("kda_decode_rows") and shape_supported(state_shape, conv_taps)
    wanted = f[ROWS_ENV] == "on" or (f[ROWS_ENV] == "auto" and tokens >= ROWS_FROM)
    return "rows" if wanted and fits else "steps"


def rows_path(state: mx.array, conv_w: mx.array, tokens: int) -> str:
    return choose_rows(settings.now(kda_ops.gpu_backend()), state.shape, conv_w.shape[0], tokens)


def decode_path(state: mx.array, conv_w: mx.array) -> str:
    return choose_decode(settings.now(kda_ops.gpu_backend()), state.shape, conv_w.shape[0])


def kda_decode_step(path, qkv, gate_a, beta_logit, conv_tail, conv_w, a_log, dt_bias, state, gate_b, norm_w, eps):
    """One fused decode step on `path` ('ref', 'ops' or 'kernel': decode_path; see kda_decode.py for the contract)."""
    step = {
        "ref": decode_step_ref,
        "ops": decode_step_ops,
        "kernel": decode_step_kernel,
    }[path]
    return step(qkv, gate_a, beta_logit, conv_tail, conv_w, a_log, dt_bias, state, gate_b, norm_w, eps)
