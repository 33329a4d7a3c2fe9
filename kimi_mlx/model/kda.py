"""Kimi Delta Attention layer: projections, short causal conv, gates, the recurrence, gated norm."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from metal_kernels import usable

from ..config import ModelConfig
from ..ops.kda import gated_norm, kda, softplus
from ..ops.fast_math import silu
from ..ops.kda_decode import decode_path, decode_step_gates_kernel, gates_kernel_supports, kda_decode_step
from ..state import KDAState


def short_conv(x: mx.array, tail: mx.array, weight: mx.array) -> tuple[mx.array, mx.array]:
    """Causal depthwise conv + SiLU in float32.

    x: [B, T, C] new inputs; tail: [B, K-1, C] previous inputs; weight: [K, C] (row K-1 = current token).
    Returns (y [B, T, C] in x's dtype, new tail [B, K-1, C]).
    """
    K = weight.shape[0]
    T = x.shape[1]
    xx = mx.concatenate([tail.astype(x.dtype), x], axis=1)
    w = weight.astype(mx.float32)
    acc = xx[:, 0:T].astype(mx.float32) * w[0:1]  # w[i : i + 1], a view: w[i] would be a gather
    for i in range(1, K):
        acc = acc + xx[:, i : i + T].astype(mx.float32) * w[i : i + 1]
    # the tail as its own array: a slice would keep all T + K - 1 rows of xx alive as the state (50 MB a KDA
    # layer at the real shape and a 2,048-token step, 1 GB over 20 layers, held between steps)
    return silu(acc).astype(x.dtype), mx.contiguous(xx[:, T:])


class KimiDeltaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, D, dim = cfg.kda_num_heads, cfg.kda_head_dim, cfg.hidden_size
        self.num_heads, self.head_dim, self.hidden_size = H, D, dim
        self.qkv_proj = nn.Linear(dim, 3 * H * D, bias=False)  # q|k|v fused at load time
        self.conv_weight = mx.zeros((cfg.conv_kernel_size, 3 * H * D))
        self.f_a_proj = nn.Linear(dim, D, bias=False)
        self.f_b_proj = nn.Linear(D, H * D, bias=False)
        self.A_log = mx.zeros((H,))
        self.dt_bias = mx.zeros((H * D,))
        self.b_proj = nn.Linear(dim, H, bias=False)
        self.g_a_proj = nn.Linear(dim, D, bias=False)
        self.g_b_proj = nn.Linear(D, H * D, bias=False)
        self.o_norm_weight = mx.ones((D,))
        self.o_proj = nn.Linear(H * D, dim, bias=False)
        self.norm_eps = cfg.rms_norm_eps

    def low_rank_inputs(self, x: mx.array):
        """(f_a(x), g_a(x), b_proj(x)): one matmul where model/fuse.py merged them into `gates_in`."""
        if "gates_in" in self:
            D = self.head_dim
            y = self.gates_in(x)
            return y[..., :D], y[..., D : 2 * D], y[..., 2 * D :]
        return self.f_a_proj(x), self.g_a_proj(x), self.b_proj(x)

    def gate(self, f_a: mx.array) -> mx.array:
        """Log-space forget gate g = -exp(A_log) * softplus(f_b(f_a) + dt_bias): [B, T, H, D] f32, <= 0."""
        B, T, _ = f_a.shape
        a = self.f_b_proj(f_a).astype(mx.float32) + self.dt_bias.astype(mx.float32)
        a = a.reshape(B, T, self.num_heads, self.head_dim)
        return -mx.exp(self.A_log.astype(mx.float32))[:, None] * softplus(a)

    def decode_gates(self, x: mx.array):
        """(f_b(f_a(x)), g_b(g_a(x)), b_proj(x)) for a decode step: f_b and g_b as one block-diagonal matmul
        over gates_in's [f_a | g_a] columns where model/fuse.py built `gates_out`."""
        if "gates_out" in self:
            D, HD = self.head_dim, self.num_heads * self.head_dim
            y = self.gates_in(x)
            fg = self.gates_out(y[..., : 2 * D])
            return fg[..., :HD], fg[..., HD:], y[..., 2 * D :]
        f_a, g_a, b_logit = self.low_rank_inputs(x)
        return self.f_b_proj(f_a), self.g_b_proj(g_a), b_logit

    def decode_step(self, x: mx.array, state: KDAState, path: str):
        """(y [B, H, D], recurrent, conv): one fused op for conv update, norms, gates, state update, readout and
        output gate (ops/kda_decode.py); on the kernel path it also applies f_b and g_b where it can. A kernel
        switched off on this machine (metal_kernels.usable) gives way to the next path down: the kernel without
        the gate projections, then the fused ops."""
        if path == "kernel" and self.gates_kernel_applies(state):
            return decode_step_gates_kernel(self.qkv_proj(x)[:, 0], self.gates_in(x)[:, 0], *self._step_rest(state),
                                            self.f_b_proj, self.g_b_proj, self.o_norm_weight, self.norm_eps)
        return self._decode_step_after_gates(x, state, "ops" if path == "kernel" and not usable("kda_decode")
                                             else path)

    def _step_rest(self, state: KDAState) -> tuple:
        return state.conv, self.conv_weight, self.A_log, self.dt_bias, state.recurrent

    def _decode_step_after_gates(self, x: mx.array, state: KDAState, path: str):
        """decode_step with f_b and g_b as matmuls before the fused step."""
        f_b, g_b, b_logit = self.decode_gates(x)
        return kda_decode_step(path, self.qkv_proj(x)[:, 0], f_b[:, 0], b_logit[:, 0], *self._step_rest(state),
                               g_b[:, 0], self.o_norm_weight, self.norm_eps)

    def gates_kernel_applies(self, state: KDAState) -> bool:
        return "gates_in" in self and usable("kda_decode_gates") and \
            gates_kernel_supports(self.f_b_proj, self.g_b_proj, state.recurrent)

    def __call__(self, x: mx.array, state: KDAState) -> mx.array:
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        if T == 1 and (path := decode_path(state.recurrent, self.conv_weight)) != "ref":
            y, state.recurrent, state.conv = self.decode_step(x, state, path)
        else:
            f_a, g_a, b_logit = self.low_rank_inputs(x)
            qkv, state.conv = short_conv(self.qkv_proj(x), state.conv, self.conv_weight)
            q, k, v = mx.split(qkv.reshape(B, T, 3, H, D), 3, axis=2)
            beta = mx.sigmoid(b_logit.astype(mx.float32))
            o, state.recurrent = kda(q[:, :, 0], k[:, :, 0], v[:, :, 0], self.gate(f_a), beta, state.recurrent)
            y = gated_norm(o, self.g_b_proj(g_a).reshape(B, T, H, D), self.o_norm_weight, self.norm_eps, x.dtype)
        return self.o_proj(y.reshape(B, T, H * D))
