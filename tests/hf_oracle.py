"""Tiny HF checkpoints and reference logits from transformers' native KimiLinearForCausalLM (torch, CPU, f32)."""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers import KimiLinearConfig, KimiLinearForCausalLM

BASE = dict(
    vocab_size=211, hidden_size=48, intermediate_size=80, moe_intermediate_size=24,
    num_attention_heads=3, num_key_value_heads=3, kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=6,
    v_head_dim=10, num_local_experts=8, num_experts_per_tok=3, n_group=1, topk_group=1,
    n_shared_experts=1, routed_scaling_factor=2.446, first_k_dense_replace=1,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5,
)


def make_config(layers: str = "kkkm", kda_heads: int = 2, kda_dim: int = 16, **over) -> KimiLinearConfig:
    """layers: one letter per layer, k = KDA, m = MLA."""
    kw = dict(BASE)
    kw.update(over)
    kw["num_hidden_layers"] = len(layers)
    kw["linear_attn_config"] = {
        "head_dim": kda_dim, "num_heads": kda_heads, "short_conv_kernel_size": 4,
        "kda_layers": [i + 1 for i, c in enumerate(layers) if c == "k"],
        "full_attn_layers": [i + 1 for i, c in enumerate(layers) if c == "m"],
    }
    return KimiLinearConfig(**kw)


def make_model(cfg: KimiLinearConfig, seed: int = 0, extreme_gates: bool = False) -> KimiLinearForCausalLM:
    torch.manual_seed(seed)
    model = KimiLinearForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "e_score_correction_bias" in name:
                p.normal_(0, 0.05)
            elif name.endswith("A_log"):
                hi = math.log(16.0) if extreme_gates else math.log(4.0)
                p.uniform_(0.0, hi)
            elif name.endswith("dt_bias") and extreme_gates:
                p.uniform_(-2.0, 8.0)
            elif "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif p.dim() >= 2 and "embed" not in name:
                p.normal_(0, 0.08)
        for buf_name, b in model.named_buffers():
            if "e_score_correction_bias" in buf_name:
                b.normal_(0, 0.05)
    return model


def save(model: KimiLinearForCausalLM, path) -> None:
    model.save_pretrained(str(path))


def logits(model: KimiLinearForCausalLM, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long), use_cache=False).logits.float().numpy()
