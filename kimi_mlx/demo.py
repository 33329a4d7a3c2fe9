"""The built-in demo models.

`demo`: a small trained Kimi Linear shipped inside the package (kimi_mlx/demo_data, 8-bit, see its
MODEL_CARD.md; trained with tools/train_demo.py). It writes plausible-looking Python.
`demo-random`: a tiny random-weight Kimi Linear written on the fly (seeded, no download) as a real
HF-layout checkpoint in a cache directory. It proves the plumbing; its text is gibberish.
Both load through the same code as a real checkpoint.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

DEMO_NAMES = ("demo", "demo-random")
RANDOM_NAMES = ("demo-random",)  # names whose weights are random (the CLI says so)
PACKAGED = Path(__file__).parent / "demo_data"
DEMO_VERSION = 2
N_RANKS = 256  # byte-level vocabulary; Kimi's 256 special ids follow

DEMO_CONFIG = {
    "architectures": ["KimiLinearForCausalLM"],
    "model_type": "kimi_linear",
    "vocab_size": N_RANKS + 256,
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "intermediate_size": 256,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": None,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "mla_use_nope": True,
    "linear_attn_config": {"kda_layers": [1, 2, 3], "full_attn_layers": [4], "num_heads": 4, "head_dim": 32,
                           "short_conv_kernel_size": 4},
    "num_experts": 16,
    "num_experts_per_token": 4,
    "num_shared_experts": 1,
    "moe_intermediate_size": 64,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "moe_renormalize": True,
    "routed_scaling_factor": 2.446,
    "num_expert_group": 1,
    "topk_group": 1,
    "bos_token_id": N_RANKS,
    "eos_token_id": N_RANKS + 2,
    "pad_token_id": N_RANKS + 255,
    "model_max_length": 1048576,
    "torch_dtype": "float32",
    "kimi_mlx_note": "RANDOM WEIGHTS: built-in demo model, not trained",
}


def _normal(rng, shape, std=0.02):
    return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)


def layer_tensors(cfg: dict, i: int, rng: np.random.Generator, normal=None) -> dict:
    """Random tensors of layer i in the HF (Moonshot) layout, initialised like upstream.

    normal(shape, std) draws the matrices (numpy by default; benchmarks pass a GPU generator).
    """
    D = cfg["hidden_size"]
    lin = cfg["linear_attn_config"]
    H, Dk, K = lin["num_heads"], lin["head_dim"], lin["short_conv_kernel_size"]
    Hm, L, nope, pe, dv = (cfg[k] for k in ("num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                                             "qk_rope_head_dim", "v_head_dim"))
    E, I = cfg["num_experts"], cfg["moe_intermediate_size"]

    def w(*shape, std=0.02):
        return normal(shape, std) if normal else _normal(rng, shape, std)

    t, p, a = {}, f"model.layers.{i}.", f"model.layers.{i}.self_attn."
    t[p + "input_layernorm.weight"] = np.ones(D, np.float32)
    t[p + "post_attention_layernorm.weight"] = np.ones(D, np.float32)
    if i + 1 in lin["kda_layers"]:
        for x in "qkv":
            t[a + f"{x}_proj.weight"] = w(H * Dk, D)
            t[a + f"{x}_conv1d.weight"] = w(H * Dk, 1, K, std=0.5)
        t[a + "A_log"] = np.log(rng.uniform(1, 16, (1, 1, H, 1))).astype(np.float32)
        dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), H * Dk))
        t[a + "dt_bias"] = (dt + np.log(-np.expm1(-dt))).astype(np.float32)
        t[a + "f_a_proj.weight"], t[a + "f_b_proj.weight"] = w(Dk, D), w(H * Dk, Dk)
        t[a + "g_a_proj.weight"], t[a + "g_b_proj.weight"] = w(Dk, D), w(H * Dk, Dk)
        t[a + "b_proj.weight"] = w(H, D)
        t[a + "o_norm.weight"] = np.ones(Dk, np.float32)
        t[a + "o_proj.weight"] = w(D, H * Dk)
    else:
        t[a + "q_proj.weight"] = w(Hm * (nope + pe), D)
        t[a + "kv_a_proj_with_mqa.weight"] = w(L + pe, D)
        t[a + "kv_a_layernorm.weight"] = np.ones(L, np.float32)
        t[a + "kv_b_proj.weight"] = w(Hm * (nope + dv), L)
        t[a + "o_proj.weight"] = w(D, Hm * dv)
    if i < cfg["first_k_dense_replace"]:
        m, F = p + "mlp.", cfg["intermediate_size"]
        t[m + "gate_proj.weight"], t[m + "up_proj.weight"], t[m + "down_proj.weight"] = w(F, D), w(F, D), w(D, F)
    else:
        m = p + "block_sparse_moe."
        t[m + "gate.weight"] = w(E, D)
        t[m + "gate.e_score_correction_bias"] = w(E, std=0.01)
        for e in range(E):
            t[m + f"experts.{e}.w1.weight"], t[m + f"experts.{e}.w3.weight"] = w(I, D), w(I, D)
            t[m + f"experts.{e}.w2.weight"] = w(D, I)
        S = I * cfg["num_shared_experts"]
        if S:
            t[m + "shared_experts.gate_proj.weight"], t[m + "shared_experts.up_proj.weight"] = w(S, D), w(S, D)
            t[m + "shared_experts.down_proj.weight"] = w(D, S)
    return t


def _hf_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    D, V = cfg["hidden_size"], cfg["vocab_size"]
    t = {"model.embed_tokens.weight": _normal(rng, (V, D), 1.0), "model.norm.weight": np.ones(D, np.float32),
         "lm_head.weight": _normal(rng, (V, D))}
    for i in range(cfg["num_hidden_layers"]):
        t.update(layer_tensors(cfg, i, rng))
    return t


def write_byte_tokenizer(out: Path) -> None:
    """A byte-level tiktoken rank file with Kimi's special-token block above it."""
    from .tokenizer import SPECIAL_OFFSETS

    lines = [base64.b64encode(bytes([b])).decode() + f" {b}" for b in range(N_RANKS)]
    (out / "tiktoken.model").write_text("\n".join(lines) + "\n")
    decoder = {str(N_RANKS + off): {"content": name, "special": True} for name, off in SPECIAL_OFFSETS.items()}
    (out / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder,
                                                           "tokenizer_class": "TikTokenTokenizer"}, indent=1))


def demo_dir(name: str = "demo") -> Path:
    """Path of a demo checkpoint: the packaged trained one, or the random one (written on first use)."""
    if name == "demo":
        if not (PACKAGED / "config.json").exists():
            from .errors import WeightsError

            raise WeightsError(f"{PACKAGED}: the packaged demo model is missing; reinstall kimi-mlx")
        return PACKAGED
    return random_demo_dir(name)


def random_demo_dir(name: str = "demo-random") -> Path:
    """Path of the random-weight demo checkpoint, written on first use (atomically) into the cache."""
    from safetensors.numpy import save_file

    root = Path(os.environ.get("KIMI_MLX_CACHE", Path.home() / ".cache" / "kimi-mlx"))
    out = root / f"{name}-v{DEMO_VERSION}"
    if (out / "config.json").exists():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        save_file(_hf_tensors(DEMO_CONFIG), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_byte_tokenizer(tmp)
        (tmp / "config.json").write_text(json.dumps(DEMO_CONFIG, indent=1))
        try:
            tmp.rename(out)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
