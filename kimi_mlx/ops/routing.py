"""MoE routing: float32 sigmoid scores, selection bias, group-limited top-k, renormalise, scale.

  route_ref     plain mx ops (the reference)
  route_kernel  one Metal or CUDA kernel per call (metal_kernels/moe_route.body)
  route         chooses: the kernel on a GPU when the shapes fit, else the reference;
                KIMI_MLX_ROUTE=ref|kernel overrides for tests and benchmarks.
Both return (indices [N, k + shared] int32, weights [N, k + shared] float32): the k picks, whose order
is not part of the contract, then `shared` always-on experts numbered E, E + 1, ... with weight 1.

The router's logits before them, float32 as upstream (x cast to float32 times the float32 weight):
  logits_ref     plain mx ops: a cast of x, then a matmul
  logits_kernel  one kernel (metal_kernels/moe_router.body) reading x in its own dtype (no cast launched)
  router_logits  chooses like route: the kernel on a GPU where the weight is kept in float32, for up to
                 LOGITS_KERNEL_ROWS tokens (decode; it reads the weight once a token, a matmul serves prefill).
"""

from __future__ import annotations

import math

import mlx.core as mx

from .. import settings
from ..errors import ConfigError

ENV = "KIMI_MLX_ROUTE"
MODES = ("auto", "ref", "kernel")


def route_ref(logits, bias, *, top_k, n_group, topk_group, renormalize, scaling, bias_in_weights=False, shared=0):
    """logits: [N, E] float32 router outputs; bias: [E]."""
    scores = mx.sigmoid(logits.astype(mx.float32))
    choice = scores + bias.astype(mx.float32)
    if n_group > 1 and topk_group < n_group:
        N, E = choice.shape
        grouped = choice.reshape(N, n_group, E // n_group)
        group_score = mx.topk(grouped, 2, axis=-1).sum(-1)  # [N, G]
        drop = mx.argpartition(group_score, n_group - topk_group - 1, axis=-1)[:, : n_group - topk_group]
        keep = mx.ones((N, n_group)) - (mx.arange(n_group)[None, None] == drop[..., None]).sum(1)
        choice = mx.where(keep[..., None] > 0, grouped, -math.inf).reshape(N, E)
    idx = mx.argpartition(-choice, top_k - 1, axis=-1)[:, :top_k]
    w = mx.take_along_axis(choice if bias_in_weights else scores, idx, axis=-1)
    if renormalize:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    idx, w = idx.astype(mx.int32), w * scaling
    if shared:
        N, E = logits.shape
        idx = mx.concatenate([idx, mx.broadcast_to(mx.arange(E, E + shared, dtype=mx.int32), (N, shared))], axis=1)
        w = mx.concatenate([w, mx.ones((N, shared), w.dtype)], axis=1)
    return idx, w


def kernel_supports(E: int, top_k: int, n_group: int) -> bool:
    per = E // 32
    return E % 32 == 0 and 1 <= per <= 16 and top_k <= 32 and E % n_group == 0 and (E // n_group) % per == 0 \
        and ((E // n_group) // per) & ((E // n_group) // per - 1) == 0


def template(E, *, top_k, n_group, topk_group, renormalize, scaling, bias_in_weights=False, shared=0):
    """The routing kernels' template arguments (moe_route)."""
    return [("E", E), ("K", top_k), ("NG", n_group), ("TG", topk_group), ("RENORM", int(renormalize)),
            ("BIAS_W", int(bias_in_weights)), ("SH", shared)]


def route_kernel(logits, bias, *, top_k, n_group, topk_group, renormalize, scaling, bias_in_weights=False,
                 shared=0):
    from metal_kernels import kernel

    N, E = logits.shape
    idx, w = kernel("moe_route")(
        inputs=[logits.astype(mx.float32), bias.astype(mx.float32), mx.array([scaling], mx.float32)],
        template=template(E, top_k=top_k, n_group=n_group, topk_group=topk_group, renormalize=renormalize,
                          scaling=scaling, bias_in_weights=bias_in_weights, shared=shared),
        grid=(32, N, 1), threadgroup=(32, 1, 1),
        output_shapes=[(N, top_k + shared)] * 2, output_dtypes=[mx.int32, mx.float32],
    )
    return idx, w


def logits_ref(x, weight):
    return x.astype(mx.float32) @ weight.astype(mx.float32).T


def logits_kernel(x, weight):
    from metal_kernels import group_rows, kernel

    N, D = x.shape
    E = weight.shape[0]
    S = group_rows(D, 8)  # 32-lane groups sharing a row
    (logits,) = kernel("moe_router")(
        inputs=[x, weight.astype(mx.float32)], template=[("D", D), ("E", E), ("S", S)],
        grid=(32 * S, E, N), threadgroup=(32 * S, 1, 1),
        output_shapes=[(N, E)], output_dtypes=[mx.float32],
    )
    return logits


LOGITS_KERNEL_ROWS = 16


def choose_logits(f: settings.Facts, rows: int, weight_f32: bool) -> str:
    """'kernel' or 'ref' for the router's logits of `rows` tokens (the kernel reads a float32 weight)."""
    fits = weight_f32 and rows <= LOGITS_KERNEL_ROWS
    return "kernel" if f[ENV] != "ref" and f.gpu and fits and f.usable("moe_router") else "ref"


def router_logits(x, weight):
    """x [N, D] @ weight [E, D]^T in float32: [N, E]."""
    from .kda import gpu_backend

    if choose_logits(settings.now(gpu_backend()), x.shape[0], weight.dtype == mx.float32) == "kernel":
        return logits_kernel(x, weight)
    return logits_ref(x, weight)


def mode() -> str:
    return settings.value(ENV)


def choose(f: settings.Facts, E: int, top_k: int, n_group: int) -> str:
    """'kernel' or 'ref' for routing over E experts, top_k picks in n_group groups."""
    m = f[ENV]
    fits = kernel_supports(E, top_k, n_group)
    if m == "kernel":
        if f.gpu is None or not fits:
            raise ConfigError(f"{ENV}=kernel needs a Metal or CUDA device and E % 32 == 0 with E / 32 <= 16")
        return "kernel"
    return "kernel" if m == "auto" and fits and f.gpu and f.usable("moe_route") else "ref"


def path(E: int, top_k: int, n_group: int) -> str:
    from .kda import gpu_backend

    return choose(settings.now(gpu_backend()), E, top_k, n_group)


def route(logits, bias, **opts):
    E = logits.shape[-1]
    if path(E, opts["top_k"], opts["n_group"]) == "kernel":
        return route_kernel(logits, bias, **opts)
    return route_ref(logits, bias, **opts)
