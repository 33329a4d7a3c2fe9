"""Shared by the converter tests: a tiny HF checkpoint whose widths every quantization mode accepts."""

from pathlib import Path

import mlx.core as mx
import numpy as np
from safetensors.numpy import load_file, save_file

import hf_oracle
from kimi_mlx.demo import write_byte_tokenizer

# every input width divisible by 64 (so every mode and group size quantizes everything), 3 of 8 experts
SHAPE = dict(hidden_size=128, intermediate_size=128, moe_intermediate_size=64, num_attention_heads=2,
             num_key_value_heads=2, kv_lora_rank=64, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
             vocab_size=256)
TOKENS = mx.array([[(i * 7919 + 13) % 256 for i in range(32)]])


def make_source(path: Path):
    """(torch model, HF checkpoint dir in Moonshot naming with a byte-level tokenizer)."""
    torch_model = hf_oracle.make_model(hf_oracle.make_config("kkkm", kda_heads=2, kda_dim=64, **SHAPE), seed=3)
    hf_oracle.save(torch_model, path)
    f = path / "model.safetensors"
    # transformers writes layer 0's dense MLP under block_sparse_moe; the released checkpoint uses mlp
    w = {k.replace("layers.0.block_sparse_moe.", "layers.0.mlp."): v for k, v in load_file(str(f)).items()}
    save_file(w, str(f), metadata={"format": "pt"})
    write_byte_tokenizer(path)
    return torch_model, path


def logits(model) -> np.ndarray:
    return np.array(model(TOKENS).astype(mx.float32))[0]


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    lp = p_logits - np.logaddexp.reduce(p_logits, axis=-1, keepdims=True)
    lq = q_logits - np.logaddexp.reduce(q_logits, axis=-1, keepdims=True)
    return (np.exp(lp) * (lp - lq)).sum(-1)
