"""Multi-head latent attention with no positional encoding, caching only latent | k_pe per token."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelConfig
from ..ops.attention import mla_attention
from ..state import MLAState
from .common import RMSNorm


class KimiMLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, L = cfg.num_attention_heads, cfg.kv_lora_rank
        self.num_heads, self.latent_rank = H, L
        self.nope, self.pe, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.scale = cfg.qk_head_dim**-0.5
        self.q_proj = nn.Linear(cfg.hidden_size, H * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, L + self.pe, bias=False)
        self.kv_a_layernorm = RMSNorm(L, cfg.latent_norm_eps)
        self.k_up = mx.zeros((H, self.nope, L))  # kv_b_proj rows of k_nope, per head
        self.v_up = mx.zeros((H, self.v_dim, L))  # kv_b_proj rows of v, per head
        self.o_proj = nn.Linear(H * self.v_dim, cfg.hidden_size, bias=False)

    def __call__(self, x: mx.array, state: MLAState) -> mx.array:
        B, T, _ = x.shape
        L = self.latent_rank
        q = self.q_proj(x).reshape(B, T, self.num_heads, self.nope + self.pe).transpose(0, 2, 1, 3)
        ckv = self.kv_a_proj_with_mqa(x)
        latent = self.kv_a_layernorm(ckv[..., :L])
        cache = state.append(mx.concatenate([latent, ckv[..., L:]], axis=-1))
        o = mla_attention(q, cache, self.k_up.astype(x.dtype), self.v_up.astype(x.dtype), self.scale)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, T, self.num_heads * self.v_dim))
