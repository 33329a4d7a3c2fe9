"""The KDA (Kimi Delta Attention) recurrence: reference in plain mx ops, and the dispatcher.

Math (per head, state S [Dv, Dk] float32):
  S <- S * exp(g_t)[None, :];  u = beta_t (v_t - S k_t);  S <- S + u k_t^T;  o_t = S q_t
with q, k L2-normalised (eps 1e-6 on the sum of squares) and q scaled by Dk^-1/2.
"""

from __future__ import annotations

import mlx.core as mx

L2_EPS = 1e-6


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


def kda(q, k, v, g, beta, state):
    """KDA attention on raw (post-conv) q, k, v; normalises q and k, then runs the recurrence.

    q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; g: [B, T, H, Dk] f32; beta: [B, T, H] f32;
    state: [B, H, Dv, Dk] f32.  Returns (o [B, T, H, Dv] f32, new state).
    """
    scale = q.shape[-1] ** -0.5
    qn = l2_normalize(q) * scale
    kn = l2_normalize(k)
    return kda_recurrent_ref(qn, kn, v, g, beta, state)
