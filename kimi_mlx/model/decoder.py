"""Decoder layers and the whole causal LM: embed -> 27 x (attention, FFN) -> norm -> lm_head."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import KDA, MOE, ModelConfig
from ..state import ModelState, new_state
from .common import MLP, RMSNorm
from .kda import KimiDeltaAttention
from .mla import KimiMLA
from .moe import KimiMoE


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int):
        super().__init__()
        self.is_kda = cfg.layer_types[i] == KDA
        self.self_attn = KimiDeltaAttention(cfg) if self.is_kda else KimiMLA(cfg)
        self.mlp = KimiMoE(cfg) if cfg.mlp_types[i] == MOE else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def __call__(self, h: mx.array, state) -> mx.array:
        h = h + self.self_attn(self.input_layernorm(h), state)
        return h + self.mlp(self.post_attention_layernorm(h))


class KimiLinearModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Model(nn.Module):
    """Kimi Linear causal LM.  model(tokens [B, T], state) -> logits [B, T, vocab]; advances state."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = KimiLinearModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def dtype(self) -> mx.Dtype:
        return self.model.norm.weight.dtype

    def new_state(self, batch_size: int = 1) -> ModelState:
        return new_state(self.config, batch_size, self.dtype)

    def hidden(self, tokens: mx.array, state: ModelState | None = None) -> mx.array:
        """Final-norm hidden states [B, T, D] (no lm_head)."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
        if state is None:
            state = self.new_state(tokens.shape[0])
        elif state.batch_size != tokens.shape[0]:
            raise ValueError(f"state holds batch {state.batch_size}, tokens have batch {tokens.shape[0]}")
        h = self.model.embed_tokens(tokens)
        for layer, s in zip(self.model.layers, state.layers):
            h = layer(h, s)
        state.offset += tokens.shape[1]
        return self.model.norm(h)

    def logits(self, h: mx.array) -> mx.array:
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def __call__(self, tokens: mx.array, state: ModelState | None = None) -> mx.array:
        return self.logits(self.hidden(tokens, state))
