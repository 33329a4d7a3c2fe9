"""Multi-head latent attention with no positional encoding, caching only latent | k_pe per token."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelConfig
from ..ops.attention import cache_rows, mla_attention
from ..ops.mla_decode import mla_decode
from ..state import LatentCache
from ..state import CACHE_GROUP_SIZE, MLAState, encode_rows
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

    def _project(self, x: mx.array):
        """(queries [B, H, T, nope + pe], cache rows [B, T, L + pe])."""
        B, T, _ = x.shape
        L = self.latent_rank
        if T == 1 and "q_kv" in self:  # decode: both projections in one matmul (model/fuse.py)
            y = self.q_kv(x)
            n = self.num_heads * (self.nope + self.pe)
            q, ckv = y[..., :n], y[..., n:]
        else:
            q, ckv = self.q_proj(x), self.kv_a_proj_with_mqa(x)
        if T == 1:  # the same layout, and no transposed view for the matmuls after it to copy
            q = q.reshape(B, self.num_heads, 1, self.nope + self.pe)
        else:
            q = q.reshape(B, T, self.num_heads, self.nope + self.pe).transpose(0, 2, 1, 3)
        return q, cache_rows(ckv, self.kv_a_layernorm.weight, self.kv_a_layernorm.eps, L)

    def _out(self, o: mx.array) -> mx.array:
        B, H, T, _ = o.shape
        o = o.reshape(B, 1, H * self.v_dim) if T == 1 else o.transpose(0, 2, 1, 3).reshape(B, T, H * self.v_dim)
        return self.o_proj(o)

    def __call__(self, x: mx.array, state: MLAState) -> mx.array:
        q, rows = self._project(x)
        cache = state.append(rows)
        return self._out(mla_attention(q, cache, self.k_up.astype(x.dtype), self.v_up.astype(x.dtype), self.scale))

    def decode(self, x: mx.array, pages: tuple, row: mx.array):
        """One token over a DecodeSlot (MLAState.decode_slot()): (output, the last page with the new row
        written). The graph depends only on the page shapes, so a compiled step keeps it while the cache
        grows inside its pages (see ops.mla_decode.mla_decode)."""
        q, rows = self._project(x)
        o, last = self.decode_row(q, rows, pages, row)
        return self._out(o), last

    def decode_row(self, q: mx.array, rows: mx.array, pages: tuple, row: mx.array):
        """decode's attention from its projections: the query q [B, H, 1, nope + pe] and the new cache row
        rows [B, 1, W]: (attention output [B, H, 1, v] before o_proj, the last page with the row written).
        model/verify.py runs it once a row over projections made for several tokens."""
        *before, last = pages
        bits = last[0].shape[-1] * 32 // rows.shape[-1] if len(last) > 1 else 0
        new = encode_rows(rows, bits, last[0].dtype)
        # a scatter, not a slice update at an array offset: MLX's CUDA kernel for that runs a thread per
        # element of the whole page, so its time grows with the page; a scatter runs one per element written;
        # both write in place when the page is not shared
        last = tuple(mx.put_along_axis(p, row, r, axis=1) for p, r in zip(last, new))
        cache = LatentCache((*before, last), bits, CACHE_GROUP_SIZE)
        o = mla_decode(q, cache, row, self.k_up.astype(q.dtype), self.v_up.astype(q.dtype), self.scale,
                       self.get("q_absorb"), self.get("v_absorb"))
        return o, last
