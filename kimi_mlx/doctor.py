"""`kimi-mlx doctor`: which device and fast paths this machine uses, and a check of each fast path
against its reference on the current device (on a Mac this is how the Metal kernels get checked)."""

from __future__ import annotations

import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import mlx.core as mx

from .errors import KimiError, first_line
from .ops import fast_math
from .ops import kda as kda_ops

TOL = 1e-4  # float32, relative to the largest magnitude


TF32_TOL = 5e-3  # CUDA runs float32 matmuls in TF32 unless MLX_ENABLE_TF32=0


@dataclass
class Check:
    name: str
    error: float | None  # max relative error; None when skipped
    note: str = ""
    tol: float = TOL
    detail: str = ""  # a check that raised: the exception's type and whole message (note holds its first line)

    @property
    def ok(self) -> bool:
        return self.error is None or self.error <= self.tol


def tf32() -> bool:
    """True when MLX's CUDA backend runs float32 matmuls in TF32 (its default)."""
    return kda_ops.gpu_backend() == "cuda" and os.environ.get("MLX_ENABLE_TF32", "1") != "0"


def _rel_err(a: mx.array, b: mx.array) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    if not bool(mx.isfinite(a).all()):
        return math.inf
    return float(mx.abs(a - b).max() / (mx.abs(b).max() + 1e-30))


def _gate(shape) -> tuple[mx.array, mx.array]:
    """Extreme gates: A up to 16 and large pre-softplus values (gate spans ~1e5 per chunk)."""
    a = mx.where(mx.random.uniform(shape=shape) < 0.5, mx.random.uniform(30.0, 150.0, shape), mx.random.normal(shape))
    return a, mx.random.uniform(math.log(4.0), math.log(16.0), (shape[-2],))


def check_chunked(use_kernel: bool, T: int = 130, B: int = 2, H: int = 3, Dk: int = 64, Dv: int = 48,
                  scan: str | None = None, intra: str = "kernel") -> Check:
    from .ops.kda_chunked import kda_chunked

    mx.random.seed(0)
    q = kda_ops.l2_normalize(mx.random.normal((B, T, H, Dk))) * Dk**-0.5
    k = kda_ops.l2_normalize(mx.random.normal((B, T, H, Dk)))
    v = mx.random.normal((B, T, H, Dv))
    a, a_log = _gate((B, T, H, Dk))
    g = -mx.exp(a_log)[:, None] * kda_ops.softplus(a)
    beta = mx.sigmoid(mx.random.normal((B, T, H)))
    state = mx.random.normal((B, H, Dv, Dk))
    o_ref, s_ref = kda_ops.kda_recurrent_ref(q, k, v, g, beta, state)
    o, s = kda_chunked(q, k, v, g, beta, state, use_kernel=use_kernel, scan=scan, intra=intra)
    err = max(_rel_err(o, o_ref), _rel_err(s, s_ref))
    chunk = "chunk kernel on the matrix units" if intra == "mma" else "chunk kernel"
    parts = (f"{chunk}, scan {scan}" if scan in ("affine", "doubling", "mma") else "chunk and scan kernels") \
        if use_kernel else "ops"
    name = f"chunked prefill, {parts} (T={T}"
    if tf32():
        return Check(name + ", TF32 matmuls)", err, tol=TF32_TOL)
    return Check(name + ")", err)


def check_intra_chunk(M: int = 6, C: int = 64, Dk: int = 64, intra: str = "kernel") -> Check:
    """A per-chunk matrices kernel (kda_chunked.INTRAS) against its ops twin, with a few rows of extreme decay
    (e^-1000)."""
    from .ops.kda_chunked import intra_chunk, intra_chunk_kernel

    mx.random.seed(1)
    q, k = (0.2 * mx.random.normal((M, C, Dk)) for _ in range(2))
    g = -mx.abs(mx.random.normal((M, C, Dk))) * mx.where(mx.random.uniform(shape=(M, C, 1)) < 0.1, 1000.0, 0.3)
    beta = mx.random.uniform(shape=(M, C))
    got, want = intra_chunk_kernel(q, k, g, beta, intra), intra_chunk(q, k, mx.exp(g), beta)
    err = max(_rel_err(a, b) for a, b in zip(got, want))
    name = f"KDA per-chunk matrices, {intra}"
    if tf32():  # the ops twin's matmuls run in TF32 there (the kernels do not): TF32_TOL, not TOL
        return Check(name + " (ops twin in TF32)", err, tol=TF32_TOL)
    return Check(name, err)


def check_decode(path: str, B: int = 2, H: int = 4, Dk: int = 128, Dv: int = 96) -> Check:
    from .ops import kda_decode

    mx.random.seed(1)
    C3 = 2 * H * Dk + H * Dv
    a, a_log = _gate((B, H, Dk))
    x = dict(
        qkv=mx.random.normal((B, C3)), gate_a=a.reshape(B, H * Dk), beta_logit=mx.random.normal((B, H)),
        conv_tail=mx.random.normal((B, 3, C3)), conv_w=0.5 * mx.random.normal((4, C3)), a_log=a_log,
        dt_bias=mx.random.normal((H * Dk,)), state=mx.random.normal((B, H, Dv, Dk)),
        gate_b=6 * mx.random.normal((B, H * Dv)), norm_w=mx.random.uniform(0.5, 1.5, (Dv,)), eps=1e-5,
    )
    step = kda_decode.decode_step_kernel if path == "kernel" else kda_decode.decode_step_ops
    got, want = step(**x), kda_decode.decode_step_ref(**x)
    err = max(_rel_err(g, w) for g, w in zip(got, want))
    return Check(f"decode step, {'fused kernel' if path == 'kernel' else 'fused ops'}", err)


def check_decode_rows(T: int = 5, B: int = 2, H: int = 4, Dk: int = 128, Dv: int = 96) -> Check:
    """The verification's KDA kernel (kda_decode_rows: T tokens in one launch) against the reference step run
    token after token: every token's output, state and conv tail."""
    from .ops import kda_decode

    mx.random.seed(7)
    C3 = 2 * H * Dk + H * Dv
    a, a_log = _gate((B, T, H, Dk))
    rows = dict(qkv=mx.random.normal((B, T, C3)), gate_a=a.reshape(B, T, H * Dk),
                beta_logit=mx.random.normal((B, T, H)), gate_b=6 * mx.random.normal((B, T, H * Dv)))
    fixed = dict(conv_w=0.5 * mx.random.normal((4, C3)), a_log=a_log, dt_bias=mx.random.normal((H * Dk,)),
                 norm_w=mx.random.uniform(0.5, 1.5, (Dv,)), eps=1e-5)
    tail, state = mx.random.normal((B, 3, C3)), mx.random.normal((B, H, Dv, Dk))
    y, after = kda_decode.decode_rows_kernel(**rows, **fixed, conv_tail=tail, state=state)
    err = 0.0
    for t in range(T):
        want_y, state, tail = kda_decode.decode_step_ref(**{k: v[:, t] for k, v in rows.items()}, **fixed,
                                                         conv_tail=tail, state=state)
        err = max(err, _rel_err(y[:, t], want_y), _rel_err(after[t][1], state), _rel_err(after[t][0], tail))
    return Check(f"verification's KDA steps, one kernel for {T} tokens", err)


def check_decode_gates(bits: int = 8, B: int = 2, H: int = 4, Dk: int = 128, Dv: int = 96) -> Check:
    """The decode kernel that also applies the quantized f_b and g_b projections, against their matmuls + the
    reference step."""
    import mlx.nn as nn

    from .ops import kda_decode

    mx.random.seed(6)
    C3 = 2 * H * Dk + H * Dv
    _, a_log = _gate((B, H, Dk))
    f_b = nn.QuantizedLinear(Dk, H * Dk, bias=False, group_size=64, bits=bits)
    g_b = nn.QuantizedLinear(Dk, H * Dv, bias=False, group_size=64, bits=bits)
    x = dict(
        qkv=mx.random.normal((B, C3)), gates=4 * mx.random.normal((B, 2 * Dk + H)),
        conv_tail=mx.random.normal((B, 3, C3)), conv_w=0.5 * mx.random.normal((4, C3)), a_log=a_log,
        dt_bias=mx.random.normal((H * Dk,)), state=mx.random.normal((B, H, Dv, Dk)), f_b=f_b, g_b=g_b,
        norm_w=mx.random.uniform(0.5, 1.5, (Dv,)), eps=1e-5,
    )
    got, want = kda_decode.decode_step_gates_kernel(**x), kda_decode.decode_step_gates_ref(**x)
    err = max(_rel_err(g, w) for g, w in zip(got, want))
    return Check(f"decode step, fused kernel with {bits}-bit f_b and g_b", err)


def check_routing() -> Check:
    """The fused routing kernel against the ops reference, grouped top-k and a shared expert included."""
    from .ops import routing

    mx.random.seed(2)
    logits, bias = 2 * mx.random.normal((64, 256)), 0.2 * mx.random.normal((256,))
    opts = dict(top_k=8, n_group=8, topk_group=4, renormalize=True, scaling=2.446, shared=1)
    (ki, kw), (ri, rw) = routing.route_kernel(logits, bias, **opts), routing.route_ref(logits, bias, **opts)
    ko, ro = mx.argsort(ki, axis=-1), mx.argsort(ri, axis=-1)
    same = bool(mx.array_equal(mx.take_along_axis(ki, ko, -1), mx.take_along_axis(ri, ro, -1)))
    err = _rel_err(mx.take_along_axis(kw, ko, -1), mx.take_along_axis(rw, ro, -1)) if same else math.inf
    return Check("MoE routing, fused kernel", err, "" if same else "picked other experts")


def check_gated_norm() -> Check:
    """KDA's output gate kernel against rms_norm x sigmoid(gate) in ops (float32 output)."""
    mx.random.seed(5)
    o, gate, w = 5 * mx.random.normal((2, 3, 8, 128)), 6 * mx.random.normal((2, 3, 8, 128)), mx.random.uniform(0.5, 1.5, (128,))
    err = _rel_err(kda_ops.gated_norm_kernel(o, gate, w, 1e-5, mx.float32), kda_ops.gated_norm_ref(o, gate, w, 1e-5, mx.float32))
    return Check("KDA output gate, kernel", err)


def check_add_norm() -> Check:
    """The residual add + RMS norm kernel against the ops (float32)."""
    from .ops import norm

    mx.random.seed(7)
    h, a, w = 3 * mx.random.normal((5, 2304)), 3 * mx.random.normal((5, 2304)), mx.random.uniform(0.5, 1.5, (2304,))
    (s, y), (rs, ry) = norm.add_norm_kernel(h, a, w, 1e-6), norm.add_norm_ref(h, a, w, 1e-6)
    return Check("residual add + norm, kernel", max(_rel_err(s, rs), _rel_err(y, ry)))


def check_cache_rows() -> Check:
    """The MLA cache-row kernel (latent norm | pe) against the ops (float32)."""
    from .ops import attention

    mx.random.seed(6)
    ckv, w = 4 * mx.random.normal((5, 576)), mx.random.uniform(0.5, 1.5, (512,))
    err = _rel_err(attention.cache_rows_kernel(ckv, w, 1e-6, 512), attention.cache_rows_ref(ckv, w, 1e-6, 512))
    return Check("MLA cache rows, kernel", err)


def check_decode_page() -> Check:
    """The one-page MLA decode kernels against the ops (float32; 32 heads, rows of 576, 300 of 512 rows valid)."""
    from .ops import mla_decode

    mx.random.seed(8)
    qa, page, last = 0.2 * mx.random.normal((1, 32, 576)), mx.random.normal((1, 512, 576)), mx.array([299], mx.int32)
    err = _rel_err(mla_decode.decode_page_kernel(qa, page, last), mla_decode.decode_page_ref(qa, page, last))
    if tf32():  # the ops twin's matmuls run in TF32 there (the kernel in float32): TF32_TOL
        return Check("MLA decode over one page, kernels (ops twin in TF32)", err, tol=TF32_TOL)
    return Check("MLA decode over one page, kernels", err)


def check_decode_split() -> Check:
    """The long-page MLA decode (matmuls around the chunk and merge kernels) against the page reference
    (float32; 32 heads, rows of 576, two pages of 1,024 rows in 512-row chunks, 1,300 rows valid)."""
    from .ops import mla_decode
    from .state import LatentCache

    mx.random.seed(9)
    qa, page = 0.2 * mx.random.normal((1, 32, 576)), mx.random.normal((1, 2048, 576))
    last = mx.array([1299], mx.int32)
    pages = ((page[:, :1024],), (page[:, 1024:],))
    got = mla_decode._decode_split(qa, LatentCache(pages, 0, 64), last - 1024)
    err = _rel_err(got, mla_decode.decode_page_ref(qa, page, last))
    if tf32():  # both sides' matmuls run in TF32 there
        return Check("MLA decode over long pages, kernels (matmuls in TF32)", err, tol=TF32_TOL)
    return Check("MLA decode over long pages, kernels", err)


def check_router_logits() -> Check:
    """The router's float32 logits kernel against the cast-and-matmul reference, a bfloat16 token."""
    from .ops import routing

    mx.random.seed(4)
    x, weight = (3 * mx.random.normal((16, 2304))).astype(mx.bfloat16), 0.02 * mx.random.normal((256, 2304))
    err = _rel_err(routing.logits_kernel(x, weight), routing.logits_ref(x, weight))
    if tf32():  # the ops twin's matmul runs in TF32 there (the kernel in float32): TF32_TOL
        return Check("MoE router logits, kernel (ops twin in TF32)", err, tol=TF32_TOL)
    return Check("MoE router logits, kernel", err)


def random_banks(E: int, D: int, I: int, bits: int = 4, group_size: int = 64, dtype=mx.float32, down_bits=None):
    """A gate|up bank [E, 2I, D] and a down bank [E, D, I] of random experts, affine-quantized."""
    from .model.moe import QuantizedSwitchLinear, SwitchLinear

    def bank(rows, cols, b):
        lin = SwitchLinear(E, cols, rows)
        lin.weight = (mx.random.normal((E, rows, cols)) * cols**-0.5).astype(dtype)
        return QuantizedSwitchLinear.from_float(lin, group_size, b, "affine")

    return bank(2 * I, D, bits), bank(D, I, down_bits or bits)


def expert_inputs(E: int, D: int, N: int, P: int, dtype=mx.float32):
    """x [N, D], P distinct experts a token (the last one shared by all, as the fused bank runs it) and
    router weights spanning three orders of magnitude."""
    x = mx.random.normal((N, D)).astype(dtype)
    routed = mx.argsort(mx.random.uniform(shape=(N, E - 1)), axis=-1)[:, : P - 1].astype(mx.int32)
    idx = mx.concatenate([routed, mx.full((N, 1), E - 1, mx.int32)], axis=1)
    w = mx.exp(mx.random.uniform(-4.0, 3.0, (N, P)))
    return x, idx, w


def check_experts() -> Check:
    """The two MoE decode kernels against MLX's gather matmuls (4-bit gate|up, 8-bit down), gate|up per pair and
    per expert of the tokens' union (moe_gate_up_union, KIMI_MLX_EXPERTS=union), and the wide pair
    (moe_gate_up_wide, moe_down_wide, KIMI_MLX_EXPERTS=wide)."""
    from .ops import experts

    mx.random.seed(3)
    gate_up, down = random_banks(12, 512, 256, bits=4, down_bits=8)
    x, idx, w = expert_inputs(12, 512, N=3, P=9)
    ref = experts.experts_ref(x, idx, w, gate_up, down)
    err = max(_rel_err(experts.experts_kernel(x, idx, w, gate_up, down, **path), ref)
              for path in ({}, {"union": True}, {"wide": True}))
    return Check("MoE experts, decode kernels", err)


def environment() -> list[tuple[str, str]]:
    from metal_kernels import backend

    from .model.decoder import prefill_memory
    from .ops import attention, linear, mla_decode, norm
    from .settings import now
    from .settings import rows as switch_rows

    info = mx.device_info() if hasattr(mx, "device_info") else {}
    gpu = kda_ops.gpu_backend()
    facts = now(gpu)  # the real shape's rows below ask the ops' own path choices
    mode = kda_ops.mode()
    from .ops.kda_decode import decode_path

    decode = decode_path(mx.zeros((1, 1, 128, 128)), mx.zeros((4, 1)))
    decode_experts = expert_path(9, 257, kernel_fits=True)
    return [
        ("mlx", mx.__version__),
        ("python", platform.python_version()),
        ("device", f"{mx.default_device()} ({info.get('device_name', 'unknown')})"),
        ("GPU backend", backend() or "none (CPU only)"),
        (kda_ops.ENV, mode),
        ("KDA prefill", {"ref": "sequential reference", "chunked": "chunked, ops",
                         "kernel": f"chunked, per-chunk matrices as a {gpu} kernel, scan across chunks "
                         + {"kernel": f"as a {gpu} kernel", "affine": "affine (a matmul a chunk)",
                            "ops": "in ops"}[kda_ops.scan_path("kernel")]}[kda_ops.prefill_path(4096)]
         + (f" (from T >= {kda_ops.CHUNKED_MIN_T})" if mode == "auto" else "")),
        ("KDA decode step", {"kernel": f"fused {gpu} kernel (f_b and g_b inside where affine 2/4/8-bit)",
                             "ops": "fused ops",
                             "ref": "unfused reference"}[decode]),
        ("MoE routing", {"kernel": f"fused {gpu} kernel", "ref": "ops"}[routing_path()]),
        ("MoE decode", (f"{gpu} kernels" if decode_experts == "kernel" else f"{decode_experts} expert matmuls")
         + " (one token, 4-bit banks)"),
        ("MoE prefill", f"{expert_path(2048 * 9, 257)} expert matmuls (2,048 tokens, real shape)"),
        ("add + norm", f"one {gpu} kernel a seam (decode)" if norm.choose(facts, 2304, 1, True) == "kernel" else "ops"),
        ("MLA decode", f"two {gpu} kernels over a page of <= {mla_decode.PAGE_KERNEL_ROWS:,} rows, else matmuls"
         f" around two {gpu} kernels (flash decoding)"
         if (mla_decode.choose(facts, 32, 576, (1024,), False, True),
             mla_decode.choose(facts, 32, 576, (131072,), False, True)) == ("page", "split")
         else f"matmuls ({attention.ENV}={attention.mode()}, {mla_decode.PAGE_ENV}={mla_decode.page_mode()})"),
        ("prefill matmuls", f"quantized linears dequantized + dense matmul from {linear.MIN_ROWS} rows"
         if linear.dequant_chosen(linear.MIN_ROWS) else "quantized matmul"),
        ("prefill memory", prefill_memory()),
        ("switches", ", ".join(f"{env}={v}" for env, v, changed in switch_rows() if changed)
         or "every one at its default (docs/switches.md lists them)"),
        ("exp, SiLU, softmax", "range reduction + polynomial (the CPU's own exp runs an element at a time)"
         if fast_math.active() else "MLX's"),
        *([("CUDA graph size", f"{os.environ.get('MLX_MAX_OPS_PER_BUFFER', 'MLX default')} ops (MLX_MAX_OPS_PER_BUFFER), "
                                  f"{os.environ.get('MLX_MAX_MB_PER_BUFFER', 'MLX default')} MB (MLX_MAX_MB_PER_BUFFER)")]
          if gpu == "cuda" else []),
    ]


def _quant(m) -> str:
    """A module's weight format: 'bf16', '4-bit affine gs64', ..."""
    if "scales" in m:
        return f"{m.bits}-bit {getattr(m, 'mode', 'affine')} gs{m.group_size}"
    return {mx.bfloat16: "bf16", mx.float16: "f16", mx.float32: "f32"}.get(m.weight.dtype, str(m.weight.dtype))


def _kda_paths(attn, s) -> str:
    from .ops.kda_decode import decode_path, gates_kernel_misfit

    import metal_kernels

    gpu = kda_ops.gpu_backend()
    decode = decode_path(s.recurrent, attn.conv_weight)
    if decode == "kernel":  # the layer's own choice (KimiDeltaAttention.decode_step), with the reason it gives way
        if attn.gates_kernel_applies(s):
            decode = f"one {gpu} kernel, f_b and g_b inside"
        elif metal_kernels.usable("kda_decode"):
            why = ("f_a/g_a not fused" if "gates_in" not in attn
                   else gates_kernel_misfit(attn.f_b_proj, attn.g_b_proj, s.recurrent))
            decode = f"{gpu} kernel, f_b and g_b as matmuls before it ({why or 'its gates kernel is switched off'})"
        else:
            decode = "fused ops (the decode kernels are switched off)"
    else:
        decode = {"ops": "fused ops", "ref": "unfused reference"}[decode]
    prefill = kda_ops.prefill_path(4096, attn.head_dim)
    prefill = {"ref": "sequential reference", "chunked": "chunked, ops",
               "kernel": f"chunked: per-chunk matrices as a {gpu} kernel, scan across chunks "
               + {"kernel": "as a kernel", "affine": "a matmul a chunk", "ops": "in ops"}[kda_ops.scan_path("kernel")]
               }[prefill]
    return f"decode: {decode}; prefill: {prefill}; projections {_quant(attn.qkv_proj)}"


def _mla_paths(attn, dtype) -> str:
    from .ops import mla_decode
    from .state import LatentCache

    W = attn.latent_rank + attn.pe
    qa = mx.zeros((1, attn.num_heads, W), dtype)
    one = LatentCache(((mx.zeros((1, 256, W), dtype),),))
    two = LatentCache(((mx.zeros((1, 512, W), dtype),),) * 2)
    gpu = kda_ops.gpu_backend()
    short = f"two {gpu} kernels" if mla_decode.page_kernel_fits(qa, one) else "matmuls"
    long = f"matmuls around two {gpu} kernels (flash decoding)" if mla_decode.split_kernels_fit(qa, two) else "matmuls"
    return (f"decode: {short} over a page of <= {mla_decode.PAGE_KERNEL_ROWS:,} rows, {long} beyond; "
            f"projections {_quant(attn.q_proj)}")


def _ffn_paths(layer) -> str:
    from .model.common import MLP
    from .model.fuse import FusedMoE
    from .ops.experts import kernel_misfit

    mlp = layer.mlp
    if isinstance(mlp, MLP):
        return f"dense FFN, {_quant(mlp.gate_proj)}"
    if not isinstance(mlp, FusedMoE):
        return "MoE, unfused (the reference modules)"
    decode = mlp.path(1)
    if decode != "kernel" and kda_ops.gpu_backend():
        pairs = mlp.gate.opts["top_k"] + mlp.num_shared
        why = kernel_misfit(mlp.gate_up_proj, mlp.down_proj, pairs) or "its kernels are switched off"
        decode = f"{decode} expert matmuls ({why})"
    elif decode == "kernel":
        decode = f"{kda_ops.gpu_backend()} kernels"
    else:
        decode = f"{decode} expert matmuls"
    return (f"MoE decode: {decode}; prefill: {mlp.path(4096)} expert matmuls; banks gate|up "
            f"{_quant(mlp.gate_up_proj)}, down {_quant(mlp.down_proj)}")


def _spans(idx: list[int]) -> str:
    """[0, 1, 2, 4] -> '0-2, 4'."""
    out, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(out)


def model_paths(model) -> list[tuple[str, str]]:
    """The paths a loaded model's layers take here, per layer kind, layers with the same paths on one row
    (`kimi-mlx doctor --model M`): what each op's path choice answers for this model's shapes and weights, and
    why a kernel does not take a layer (a quantization it does not read, a kernel switched off at load)."""
    import metal_kernels

    state = model.new_state(1)
    rows: dict[tuple[str, str], list[int]] = {}
    for i in model.owned:
        layer, s = model.model.layers[i], state.layers[i]
        kind = "KDA" if layer.is_kda else "MLA"
        attn = _kda_paths(layer.self_attn, s) if layer.is_kda else _mla_paths(layer.self_attn, model.dtype)
        rows.setdefault((f"{kind} attention", attn), []).append(i)
        rows.setdefault(("FFN", _ffn_paths(layer)), []).append(i)
    order = sorted(rows.items(), key=lambda r: (r[0][0] == "FFN", r[1][0]))  # attention rows, then FFN rows
    out = [(f"{kind}, layer{'s' if len(idx) > 1 else ''} {_spans(idx)}", desc) for (kind, desc), idx in order]
    off = metal_kernels.switched_off()
    out.append(("switched off", "; ".join(f"{k} ({v})" for k, v in off.items()) if off else "none"))
    return out


def routing_path() -> str:
    from .ops.routing import path

    return path(256, 8, 1)


def expert_path(pairs: int, experts: int, kernel_fits: bool = False) -> str:
    from .model.fuse import expert_path as choose

    return choose(pairs, experts, kernel_fits)


GPU_CHECKS = {
    "KDA per-chunk matrices, kernel": check_intra_chunk,
    "KDA per-chunk matrices, mma": partial(check_intra_chunk, intra="mma"),
    "chunked prefill, chunk and scan kernels": partial(check_chunked, True),
    "chunked prefill, chunk kernel, scan affine": partial(check_chunked, True, scan="affine"),
    "chunked prefill, chunk kernel on the matrix units, scan doubling": partial(check_chunked, True, scan="doubling",
                                                                                 intra="mma"),
    "chunked prefill, chunk kernel, scan mma": partial(check_chunked, True, scan="mma"),
    "decode step, fused kernel": partial(check_decode, "kernel"),
    "verification's KDA steps, one kernel": check_decode_rows,
    "decode step, fused kernel with 8-bit f_b and g_b": check_decode_gates,
    "decode step, fused kernel with 4-bit f_b and g_b": partial(check_decode_gates, 4),
    "KDA output gate, kernel": check_gated_norm,
    "MLA cache rows, kernel": check_cache_rows,
    "MLA decode over one page, kernels": check_decode_page,
    "MLA decode over long pages, kernels": check_decode_split,
    "residual add + norm, kernel": check_add_norm,
    "MoE router logits, kernel": check_router_logits,
    "MoE routing, fused kernel": check_routing,
    "MoE experts, decode kernels": check_experts,
}


def _guarded(name, check) -> Check:
    """A check whose kernel fails to build or run is a failed check with MLX's message, not a traceback."""
    try:
        return check()
    except Exception as e:  # noqa: BLE001 - any failure of a kernel is what the doctor reports
        return Check(name, math.inf, f"{type(e).__name__}: {first_line(e)}",
                     detail=f"{type(e).__name__}: {str(e).strip()}")


def run_checks(each=None) -> list[Check]:
    """Every check, in order; each(check) is called as each one ends (on a GPU a check may compile its kernels for a
    minute, so the doctor prints a check's line when it has one rather than all of them at the end)."""
    jobs = [("chunked prefill, ops", partial(check_chunked, False)),
            ("decode step, fused ops", partial(check_decode, "ops")), *GPU_CHECKS.items()]
    gpu = kda_ops.gpu_backend()
    checks = []
    for name, check in jobs:
        gpu_only = name in GPU_CHECKS
        c = _guarded(name, check) if gpu or not gpu_only else Check(name, None, "no Metal or CUDA backend here")
        if each is not None:
            each(c)
        checks.append(c)
    return checks


def check_line(c: Check) -> str:
    if c.error is None:
        return f"  skip  {c.name}: {c.note}"
    return (f"  {'ok  ' if c.ok else 'FAIL'}  {c.name}: max rel err {c.error:.1e} (tolerance {c.tol:.0e})"
            + (f"; {c.note}" if c.note else ""))


def main(echo=print, report: str | None = None, speed: bool = True, model=None) -> bool:
    """Print the device, the active paths and every check; True when every check passed. report: also write
    them, the machine, the versions and (speed) a speed sample to that Markdown file. model: a loaded model,
    whose layers' paths are listed too (model_paths)."""
    target = report_target(report) if report else None  # a bad path fails here, before anything runs
    env = environment()
    if model is not None:
        env += [(f"model {k}", v) for k, v in model_paths(model)]
    for key, value in env:
        echo(f"{key:>16}: {value}")
    echo("")
    checks = run_checks(lambda c: echo(check_line(c)))
    if target is not None:
        sample = speed_sample(SPEED_SECONDS) if speed else None
        write_atomically(target, render_report(env, checks, sample))
        echo(f"\nreport written to {target}")
    return all(c.ok for c in checks)


# -- the report (`kimi-mlx doctor --report FILE`) ------------------------------------------------------------

SPEED_SECONDS = 10.0  # decode time of each speed sample (the demo's, then the full shape's)
SAMPLE_PROMPT = 64  # tokens prefilled before a sample decodes
HEADROOM = 4 * 2**30  # memory the full-shape sample leaves beyond its weights: its state, a layer being built, the OS
GiB = 2**30


def report_target(path: str) -> Path:
    """The report's path, refused in one line where it cannot be written (nothing has run or been written yet)."""
    target = Path(path).expanduser().absolute()
    where = target.parent
    if target.is_dir():
        raise KimiError(f"--report {path}: is a directory; give a file name, e.g. {Path(path) / 'kimi-mlx-report.md'}")
    if not where.is_dir():
        raise KimiError(f"--report {path}: the directory {where} does not exist; create it or give a path in an "
                        "existing directory")
    if not os.access(where, os.W_OK | os.X_OK):
        raise KimiError(f"--report {path}: the directory {where} is not writable by you; give a path in one that is, "
                        "e.g. --report ~/kimi-mlx-report.md")
    return target


def write_atomically(target: Path, text: str) -> None:
    """Write text to a temporary file beside target, then rename it over target: a reader sees the whole report
    or none (the rename is atomic within a directory), never a half-written one."""
    import tempfile

    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes the file private; a report gets the usual permissions
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise KimiError(f"--report {target}: could not write it ({e.strerror or first_line(e)}); "
                        "give a path on a disk with space that you can write to") from None


def _run(*cmd: str) -> str:
    """A command's stripped stdout, or "" where it is missing, fails or hangs."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _proc_field(path: str, key: str) -> str:
    """The value after `key:` on the first matching line of a /proc file ("" where absent)."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return ""


def total_ram() -> int | None:
    """Bytes of RAM: sysctl hw.memsize on macOS, /proc/meminfo on Linux, else sysconf."""
    if sys.platform == "darwin" and (size := _run("sysctl", "-n", "hw.memsize")).isdigit():
        return int(size)
    kb = _proc_field("/proc/meminfo", "MemTotal").split()
    if kb and kb[0].isdigit():
        return int(kb[0]) * 1024
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _device_info() -> dict:
    return mx.device_info() if hasattr(mx, "device_info") else {}


def device_memory() -> tuple[int | None, str]:
    """(bytes a model may hold on this device, what that figure is): Metal's recommended working set (what the
    GPU keeps resident without paging), else the device's memory, else the RAM."""
    info = _device_info()
    if info.get("max_recommended_working_set_size"):
        return int(info["max_recommended_working_set_size"]), "the GPU's recommended working set"
    if info.get("memory_size"):
        return int(info["memory_size"]), "device memory"
    return total_ram(), "RAM"


def _home(text: str) -> str:
    """text with the home directory written ~ (a report is attached to public issues: no user name in it)."""
    home = str(Path.home())
    return text.replace(home, "~") if len(home) > 1 else text


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / GiB:.1f} GiB"


def machine() -> list[tuple[str, str]]:
    info = _device_info()
    if sys.platform == "darwin":
        os_name = f"macOS {platform.mac_ver()[0]} ({platform.platform()})"
        chip = _run("sysctl", "-n", "machdep.cpu.brand_string")
    else:
        os_name = platform.platform()
        chip = _proc_field("/proc/cpuinfo", "model name")
    rows = [("OS", os_name), ("machine", platform.machine()),
            ("chip", chip or platform.processor() or "unknown"), ("CPU cores", str(os.cpu_count())),
            ("memory", _gib(total_ram()))]
    rows += [(f"MLX device {key}", _gib(info[key]) if key.endswith("size") else str(info[key]))
             for key in ("device_name", "architecture", "memory_size", "max_recommended_working_set_size")
             if info.get(key)]
    return rows


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def versions() -> list[tuple[str, str]]:
    rows = [("kimi-mlx", _version("kimi-mlx") or "not installed as a package (run from a source tree)")]
    root = Path(__file__).resolve().parent.parent
    if (root / ".git").exists():  # a source checkout (pip install -e): the commit says more than the version
        commit = _run("git", "-C", str(root), "rev-parse", "--short", "HEAD")
        dirty = _run("git", "-C", str(root), "status", "--porcelain", "--untracked-files=no")
        if commit:
            rows.append(("kimi-mlx commit", commit + (" (with uncommitted changes)" if dirty else "")))
    rows.append(("MLX", mx.__version__))
    rows += [(dist, v) for dist in ("mlx-metal", "mlx-cuda", "mlx-cuda-12", "mlx-cuda-13", "mlx-cpu", "mlx-lm")
             if (v := _version(dist))]
    python = f"{platform.python_version()} ({platform.python_implementation()}, {_home(sys.executable)})"
    rows.append(("Python", python))
    return rows


def settings() -> list[str]:
    """The KIMI_MLX_* and MLX_* variables this process runs with; those kimi-mlx set itself (kimi_mlx/__init__.py:
    MLX's CUDA graph limits, off macOS, where the user left them unset) said so."""
    from . import CUDA_GRAPH_LIMITS

    ours = {k: v for k, v in CUDA_GRAPH_LIMITS.items() if sys.platform != "darwin"}
    return [f"`{k}={_home(v)}`" + (" (kimi-mlx's default here)" if ours.get(k) == v else "")
            for k, v in sorted(os.environ.items()) if k.startswith(("KIMI_MLX_", "MLX_"))]


def _decode_rate(model, seconds: float) -> tuple[float, int]:
    """(decode tok/s, tokens timed): a prompt of SAMPLE_PROMPT random tokens prefilled, a few untimed tokens
    (they build the decode kernels), then greedy tokens for `seconds`, each step queued while the last is read
    (bench.decode_phases, as `kimi-mlx bench` times decode)."""
    from .bench import DECODE_WARMUP, Runner, decode_phases

    mx.random.seed(0)
    r = Runner("kimi-mlx", model, True)
    r.reset()
    r.prefill_step(mx.random.randint(0, model.config.vocab_size, (1, SAMPLE_PROMPT)))
    y, _ = decode_phases(r, DECODE_WARMUP - 1)
    n, t0 = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - t0 < seconds:
        y, _ = decode_phases(r, 4, y)
        n += 4
    y.item()
    return n / (time.perf_counter() - t0), n


def full_shape_bytes(bits: int = 4) -> int:
    """Bytes of `kimi-mlx bench --shape full`'s weights on a GPU: `bits`-bit affine with bfloat16 scales and
    biases, counted on a model that is never evaluated (MLX arrays are lazy: shapes without memory)."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from . import bench
    from .config import ModelConfig
    from .model import Model

    cfg = ModelConfig.from_dict(bench.FULL)
    model = Model(cfg)
    nn.quantize(model, class_predicate=bench.recipe_predicate(cfg, bits, 64)(""))
    return sum(v.size * 2 if name.endswith((".scales", ".biases")) else v.nbytes
               for name, v in tree_flatten(model.parameters()))


def full_shape_skip(weights: int) -> str | None:
    """Why the full-shape sample (`weights` bytes) does not run here, or None when it does."""
    if not kda_ops.gpu_backend():
        return "skipped: no Metal or CUDA backend here (the full-shape sample is for GPUs)"
    have, what = device_memory()
    need = weights + HEADROOM
    if have is None or have < need:
        return (f"skipped: {_gib(have)} of memory ({what}), the full shape needs ~{need / GiB:.0f} GiB "
                f"({weights / GiB:.1f} GiB of 4-bit weights + {HEADROOM / GiB:.0f} GiB headroom)")
    return None


def speed_sample(seconds: float, say=lambda line: print(line, file=sys.stderr)) -> list[str]:
    """Markdown lines: the demo model's decode tok/s, then the full shape's where the memory allows; each decodes
    for `seconds`. A failure or Ctrl-C ends the sample with a line saying so (the report is still written)."""
    import gc

    from .bench import activation_dtype, build
    from .weights.load import load_model

    lines: list[str] = []
    say(f"speed sample: demo decode for {seconds:g} s (--no-speed skips it)")
    step = "the demo model"
    try:
        t0 = time.perf_counter()
        model = load_model("demo")
        rate, n = _decode_rate(model, seconds)
        lines.append(f"- demo decode: {rate:.1f} tok/s ({n} greedy tokens after a {SAMPLE_PROMPT}-token prompt, "
                     f"the packaged 8-bit demo model; {time.perf_counter() - t0:.1f} s with loading)")
        say(lines[-1][2:])
        del model
        gc.collect()
        mx.clear_cache()
        step = "the full shape"
        weights = full_shape_bytes()
        skip = full_shape_skip(weights)
        if skip:
            lines.append(f"- full-shape decode: {skip}")
            say(lines[-1][2:])
            return lines
        say(f"speed sample: building the full shape ({weights / GiB:.0f} GiB of random 4-bit weights), "
            f"then decoding for {seconds:g} s")
        t0 = time.perf_counter()
        mx.reset_peak_memory()
        model, _, _ = build("full", 4, dtype=activation_dtype(), peer=False)
        built = time.perf_counter() - t0
        rate, n = _decode_rate(model, seconds)
        lines.append(f"- full-shape decode: {rate:.1f} tok/s ({n} greedy tokens after a {SAMPLE_PROMPT}-token "
                     f"prompt; random 48B-A3B weights, 4-bit affine, as `kimi-mlx bench --shape full`; built in "
                     f"{built:.1f} s; peak memory {_gib(mx.get_peak_memory())})")
        say(lines[-1][2:])
        del model
        gc.collect()
        mx.clear_cache()
    except KeyboardInterrupt:
        lines.append(f"- interrupted (Ctrl-C) during {step}")
        say(lines[-1][2:])
    except Exception as e:  # noqa: BLE001 - a failing sample is what the report is for
        lines.append(f"- {step} failed:\n\n{_fenced(f'{type(e).__name__}: {str(e).strip()}')}")
        say(f"speed sample: {step} failed: {type(e).__name__}: {first_line(e)}")
    return lines


def _cell(text: str) -> str:
    """text inside a Markdown table cell (a | would end the cell)."""
    return text.replace("|", "\\|").replace("\n", " ")


def _fenced(text: str) -> str:
    """text in a code block whose fence is longer than any run of backticks in it."""
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall("`+", text)), default=0))
    return f"{fence}text\n{text}\n{fence}"


def render_report(env: list[tuple[str, str]], checks: list[Check], sample: list[str] | None) -> str:
    failed = [c for c in checks if not c.ok]
    ran = [c for c in checks if c.error is not None]
    out = ["# kimi-mlx doctor report", "",
           f"Written {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} by `kimi-mlx doctor --report`. "
           + (f"**{len(failed)} of {len(ran)} checks FAILED.**" if failed else f"All {len(ran)} checks that ran passed"
              + f" ({len(checks) - len(ran)} skipped)."), ""]
    out += ["## Machine", "", *(f"- {k}: {v}" for k, v in machine()), ""]
    out += ["## Versions", "", *(f"- {k}: {v}" for k, v in versions()), ""]
    out += ["## Kernel checks", "", "| check | max rel err | tolerance | result | note |", "|---|---|---|---|---|"]
    for c in checks:
        err = "-" if c.error is None else f"{c.error:.1e}"
        result = "skip" if c.error is None else "ok" if c.ok else "FAIL"
        out.append(f"| {_cell(c.name)} | {err} | {c.tol:.0e} | {result} | {_cell(c.note)} |")
    for c in failed:
        out += ["", f"### FAIL: {c.name}", "",
                _fenced(c.detail) if c.detail else f"max rel err {c.error:.3e} > tolerance {c.tol:.0e}"
                + (f"; {c.note}" if c.note else "")]
    out += ["", "## Active paths", "", *(f"- {k}: {v}" for k, v in env)]
    out.append("- environment: " + (", ".join(settings()) or "no KIMI_MLX_* or MLX_* variable set"))
    import metal_kernels

    off = metal_kernels.switched_off()  # the probe at load: a kernel that failed to build or run here
    out.append("- kernels switched off on this machine: "
               + ("; ".join(f"{k} ({v})" for k, v in off.items()) if off else "none"))
    out += ["", "## Speed", ""]
    out += sample if sample is not None else ["- not measured (--no-speed)"]
    return "\n".join(out) + "\n"
