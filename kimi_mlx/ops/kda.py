"""The KDA (Kimi Delta Attention) recurrence: reference in plain mx ops, and the one place that
chooses between the reference and the fast paths.

Math (per head, state S [Dv, Dk] float32):
  S <- S * exp(g_t)[None, :];  u = beta_t (v_t - S k_t);  S <- S + u k_t^T;  o_t = S q_t
with q, k L2-normalised (eps 1e-6 on the sum of squares) and q scaled by Dk^-1/2.

Paths: prefill (T > 1) runs `kda_recurrent_ref` or `kda_chunked`; a decode step (T = 1, from the
pre-conv projections) runs the model's unfused reference, `decode_step_ops` or the fused kernel
(ops/kda_decode.py: decode_path chooses).
`KIMI_MLX_KDA` overrides the choice for tests and benchmarks:
  auto (default)  chunked prefill from CHUNKED_MIN_T tokens; on a GPU its per-chunk matrices, its
                  scan across chunks and the decode step are kernels, on CPU ops
  ref             the sequential reference everywhere
  chunked         chunked prefill in ops for every T > 1, fused decode step in ops
  kernel          chunked prefill with its kernels (per-chunk matrices, scan) for every T > 1, fused
                  decode kernel (needs Metal or CUDA)
`KIMI_MLX_KDA_SCAN` picks the chunked prefill's scan across chunks (choose_scan) and `KIMI_MLX_KDA_INTRA` its
per-chunk matrices kernel (choose_intra).
"""

from __future__ import annotations

import mlx.core as mx

from .. import settings
from ..errors import ConfigError
from . import fast_math

L2_EPS = 1e-6
ENV = "KIMI_MLX_KDA"
MODES = ("auto", "ref", "chunked", "kernel")
SCAN_ENV = "KIMI_MLX_KDA_SCAN"
INTRA_ENV = "KIMI_MLX_KDA_INTRA"
INTRA_KERNELS = {"kernel": "kda_intra_chunk", "mma": "kda_intra_chunk_mma"}  # choose_intra's choice -> its kernel
CHUNKED_MIN_T = 16  # below this the per-token loop is cheaper than one padded chunk


def softplus(x: mx.array) -> mx.array:
    """PyTorch softplus (beta 1, linear above 20)."""
    return mx.where(x > 20.0, x, mx.logaddexp(x, mx.zeros_like(x)))


def l2_normalize(x: mx.array) -> mx.array:
    """x / sqrt(sum(x^2) + 1e-6) over the last axis, in float32 (fla's l2norm)."""
    x = x.astype(mx.float32)
    return x * mx.rsqrt((x * x).sum(-1, keepdims=True) + L2_EPS)


def kda_recurrent_ref(q, k, v, g, beta, state):
    """Sequential reference on normalised inputs.

    q, k: [B, T, H, Dk] f32 (q already scaled); v: [B, T, H, Dv]; g: [B, T, H, Dk] log-decay <= 0;
    beta: [B, T, H]; state: [B, H, Dv, Dk] f32.  Returns (o [B, T, H, Dv] f32, state).
    """
    v = v.astype(mx.float32)
    g = g.astype(mx.float32)
    beta = beta.astype(mx.float32)
    outs = []
    for t in range(q.shape[1]):
        state = state * mx.exp(g[:, t])[:, :, None, :]
        kt = k[:, t]
        pred = (state * kt[:, :, None, :]).sum(-1)  # [B, H, Dv]
        u = beta[:, t][..., None] * (v[:, t] - pred)
        state = state + u[..., :, None] * kt[:, :, None, :]
        outs.append((state * q[:, t][:, :, None, :]).sum(-1))
    return mx.stack(outs, axis=1), state


def mode() -> str:
    """The path policy: KIMI_MLX_KDA if set, else 'auto'."""
    return settings.value(ENV)


def gpu_backend() -> str | None:
    """'metal' or 'cuda' when MLX runs on that GPU by default here, else None."""
    from metal_kernels import backend

    kind = backend()
    return kind if kind and mx.default_device() == mx.gpu else None


def choose_prefill(f: settings.Facts, T: int, dk: int = 128) -> str:
    """'ref', 'chunked' (all ops) or 'kernel' (chunked, the per-chunk matrices and scan as GPU kernels) for a call
    over T tokens of post-conv q, k, v with head dim dk."""
    m = f[ENV]
    if m == "ref" or T == 1:
        return "ref"
    if m == "chunked":
        return "chunked"
    if m == "kernel":
        _require_kernels(f.gpu, dk)
        return "kernel"
    if T < CHUNKED_MIN_T:
        return "ref"
    usable = f.usable(INTRA_KERNELS[choose_intra(f)])
    return "kernel" if f.gpu and dk % 32 == 0 and usable else "chunked"


def prefill_path(T: int, dk: int = 128) -> str:
    return choose_prefill(settings.now(gpu_backend()), T, dk)


def choose_scan(f: settings.Facts, path: str) -> str:
    """The chunked prefill's scan across chunks (kda_chunked.SCANS) on prefill path `path`: KIMI_MLX_KDA_SCAN
    if set, else on the 'kernel' path 'affine' on CUDA (one matmul a chunk in order, on the tensor cores, where
    the scan kernel's state rows run on CUDA cores: RESULTS.md times both) and the scan kernel on Metal (not yet
    timed there), and ops on the 'chunked' path."""
    choice = f[SCAN_ENV]
    if choice in ("kernel", "mma") and path != "kernel":
        raise ConfigError(f"{SCAN_ENV}={choice} needs the KDA kernels ({ENV}=auto or kernel on a GPU)")
    if choice == "mma" and not f.usable("kda_scan_mma"):  # the load-time probe switched it off: the ops twin
        return "affine"
    if choice != "auto":
        return choice
    if path != "kernel":
        return "ops"
    return "affine" if f.gpu == "cuda" or not f.usable("kda_chunk_scan") else "kernel"


def scan_path(path: str) -> str:
    return choose_scan(settings.now(gpu_backend()), path)


def choose_intra(f: settings.Facts) -> str:
    """Which kernel forms the per-chunk matrices on the 'kernel' prefill path (kda_chunked.INTRAS):
    KIMI_MLX_KDA_INTRA if set, else 'kernel' (the products on the CUDA / SIMD cores). 'mma' (the same products as
    tiles on the matrix units) stays opt-in until a GPU run times it against 'kernel' (benchmarks/kda.py --parts):
    so far it has run in the CPU emulator, the static Metal check and NVRTC only. Switched off by the load-time
    probe, 'mma' gives way to 'kernel'."""
    choice = f[INTRA_ENV]
    return "mma" if choice == "mma" and f.usable("kda_intra_chunk_mma") else "kernel"


def intra_path() -> str:
    return choose_intra(settings.now(gpu_backend()))


def _require_kernels(gpu: str | None, dk: int) -> None:
    if gpu is None:
        raise ConfigError(f"{ENV}=kernel needs MLX's Metal or CUDA backend as the default device")
    if dk % 32:
        raise ConfigError(f"{ENV}=kernel: the KDA kernels need a head dim divisible by 32 (got {dk})")


def kda(q, k, v, g, beta, state):
    """KDA attention on raw (post-conv) q, k, v; normalises q and k, then runs the recurrence.

    q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; g: [B, T, H, Dk] f32; beta: [B, T, H] f32;
    state: [B, H, Dv, Dk] f32.  Returns (o [B, T, H, Dv] f32, new state).
    """
    scale = q.shape[-1] ** -0.5
    qn = l2_normalize(q) * scale
    kn = l2_normalize(k)
    path = prefill_path(q.shape[1], q.shape[-1])
    if path == "ref":
        return kda_recurrent_ref(qn, kn, v, g, beta, state)
    from .kda_chunked import kda_chunked

    kernel = path == "kernel"
    return kda_chunked(qn, kn, v, g, beta, state, use_kernel=kernel, scan=scan_path(path),
                       intra=intra_path() if kernel else "kernel")


def gated_norm_ref(o, gate, weight, eps: float, dtype, sigmoid=mx.sigmoid) -> mx.array:
    """KDA's output gate: rms_norm(o) over the head dim (float32) times sigmoid(gate), cast to dtype."""
    f32 = mx.float32
    return (mx.fast.rms_norm(o.astype(f32), weight.astype(f32), eps) * sigmoid(gate.astype(f32))).astype(dtype)


def gated_norm_kernel(o, gate, weight, eps: float, dtype) -> mx.array:
    """gated_norm_ref as one kernel (metal_kernels/kda_gated_norm.body); the head dim a multiple of 32."""
    from metal_kernels import group_rows, kernel

    D = o.shape[-1]
    rows = o.size // D
    (y,) = kernel("kda_gated_norm")(
        inputs=[o.astype(mx.float32), gate, weight.astype(mx.float32), mx.array([eps], mx.float32)],
        template=[("D", D)], grid=(32 * rows, 1, 1), threadgroup=(32 * group_rows(rows, 4), 1, 1),
        output_shapes=[o.shape], output_dtypes=[dtype],
    )
    return y


def choose_gated_norm(f: settings.Facts, D: int) -> str:
    """'kernel' on a GPU (unless KIMI_MLX_KDA=ref or =chunked, the ops paths), else 'ref', for rows of width D."""
    return "kernel" if f[ENV] in ("auto", "kernel") and f.gpu and D % 32 == 0 and f.usable("kda_gated_norm") \
        else "ref"


def gated_norm(o, gate, weight, eps: float, dtype) -> mx.array:
    """o [..., D] float32, gate [..., D] -> [..., D] in dtype (choose_gated_norm's path)."""
    if choose_gated_norm(settings.now(gpu_backend()), o.shape[-1]) == "kernel":
        return gated_norm_kernel(o, gate, weight, eps, dtype)
    return gated_norm_ref(o, gate, weight, eps, dtype, fast_math.sigmoid)  # on the CPU the polynomial's
