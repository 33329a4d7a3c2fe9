"""Name and layout mapping from the HF (Moonshot) checkpoint to this project's modules.

Each rule is a small function over the flat {name: array} dict of one layer, so the converter can
apply them layer by layer while streaming.
"""

from __future__ import annotations

import re

import mlx.core as mx

from ..config import KDA, MOE, ModelConfig
from ..errors import WeightsError

LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def is_hf_layout(names) -> bool:
    return any(".block_sparse_moe." in n or n.endswith("q_conv1d.weight") or ".kv_b_proj." in n for n in names)


def _take(w: dict, name: str) -> mx.array:
    try:
        return w.pop(name)
    except KeyError:
        raise WeightsError(f"checkpoint is missing tensor '{name}'; the checkpoint is incomplete") from None


def stacked_conv_weight(convs: list[mx.array]) -> mx.array:
    """The q, k, v depthwise conv weights ([P, 1, K] HF, [P, K, 1] mlx-lm) as one [K, 3P] conv_weight, row-major:
    kept as a transposed view, every decode step on a GPU would copy it before the KDA kernel."""
    return mx.contiguous(mx.concatenate([c.reshape(c.shape[0], -1) for c in convs], axis=0).T)


def hf_layer_to_local(cfg: ModelConfig, i: int, w: dict) -> dict:
    """Map one layer's HF tensors (names with prefix model.layers.i.) to local names."""
    p = f"model.layers.{i}."
    a = p + "self_attn."
    out = {}
    if cfg.layer_types[i] == KDA:
        out[a + "qkv_proj.weight"] = mx.concatenate([_take(w, a + f"{x}_proj.weight") for x in "qkv"], axis=0)
        convs = [_take(w, a + f"{x}_conv1d.weight") for x in "qkv"]
        out[a + "conv_weight"] = stacked_conv_weight(convs)
        out[a + "A_log"] = _take(w, a + "A_log").reshape(-1)
        out[a + "dt_bias"] = _take(w, a + "dt_bias").reshape(-1)
        out[a + "o_norm_weight"] = _take(w, a + "o_norm.weight")
    else:
        kv_b = _take(w, a + "kv_b_proj.weight")
        H, nope = cfg.num_attention_heads, cfg.qk_nope_head_dim
        kv_b = kv_b.reshape(H, nope + cfg.v_head_dim, -1)
        out[a + "k_up"] = kv_b[:, :nope]
        out[a + "v_up"] = kv_b[:, nope:]
    m = p + "block_sparse_moe."
    if cfg.mlp_types[i] == MOE:
        for ours, theirs in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            out[p + f"mlp.experts.{ours}.weight"] = mx.stack(
                [_take(w, m + f"experts.{e}.{theirs}.weight") for e in range(cfg.num_experts)]
            )
    for name in list(w):
        if name.startswith(m):  # MoE router/shared expert; transformers also writes the dense MLP here
            out[p + "mlp." + name[len(m):]] = w.pop(name)
    out.update(w)  # everything else keeps its name
    w.clear()
    return out


def hf_to_local(cfg: ModelConfig, weights: dict) -> dict:
    by_layer: dict[int, dict] = {}
    out = {}
    for name, arr in weights.items():
        if arr.size == 0:
            continue  # transformers writes empty shared experts when there are none
        m = LAYER_RE.match(name)
        if m is None:
            if not name.startswith("model.mtp") and "rotary_emb" not in name:
                out[name] = arr
            continue
        i = int(m.group(1))
        if i >= cfg.num_hidden_layers:
            continue  # speculative / MTP layers beyond the model
        by_layer.setdefault(i, {})[name] = arr
    for i, w in sorted(by_layer.items()):
        out.update(hf_layer_to_local(cfg, i, w))
    return out
