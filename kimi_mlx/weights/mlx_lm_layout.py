"""Checkpoints converted by mlx-lm's kimi_linear (the mlx-community repos), mapped to local names.

mlx-lm's sanitize writes (per layer, prefix model.layers.i.):
  self_attn.{q,k,v}_proj            separate; here fused into qkv_proj (quantized rows concatenate
                                    exactly when the three share one spec, else they are dequantized)
  self_attn.{q,k,v}_conv.conv.weight  [P, K, 1] MLX conv layout; here conv_weight [K, 3P]
  self_attn.A_log [1,1,H,1], dt_bias [P], o_norm.weight   -> A_log [H], dt_bias, o_norm_weight
  self_attn.embed_q [H, L, nope], unembed_out [H, v, L] (MultiLinear, maybe quantized)
                                    -> k_up [H, nope, L], v_up [H, v, L] (float); older files may
                                    still hold kv_b_proj, split the same way
  mlp.switch_mlp.{gate,up,down}_proj -> mlp.experts.*  (quantized banks keep their layout)
  mlp.gate (8-bit in mlx-lm)        -> mlp.gate.weight, dequantized (the router is float here)
  mlp.e_score_correction_bias       -> mlp.gate.e_score_correction_bias
The first port (mlx-lm PR #577, the earliest mlx-community uploads) also renamed kv_a_proj_with_mqa ->
kv_a_proj and kv_a_layernorm -> kv_a_norm, kept kv_b_proj whole and stored A_log as [H]; those map too.
Its `quantization` block (global spec + per-module entries) is translated to the local module paths.
"""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx

from ..config import KDA, ModelConfig
from ..errors import WeightsError
from .layout import stacked_conv_weight

GLOBAL_KEYS = ("group_size", "bits", "mode")
RENAMES = ((".mlp.switch_mlp.", ".mlp.experts."),
           (".self_attn.kv_a_proj.", ".self_attn.kv_a_proj_with_mqa."),  # the first port's MLA names
           (".self_attn.kv_a_norm.", ".self_attn.kv_a_layernorm."))


def is_mlx_lm_layout(names) -> bool:
    return any(".switch_mlp." in n or ".embed_q." in n or ".q_conv.conv." in n for n in names)


class _Reader:
    def __init__(self, weights: dict, quant: dict):
        self.w, self.q = weights, quant

    def spec(self, path: str) -> dict:
        s = self.q.get(path)
        s = s if isinstance(s, dict) else self.q
        return {"group_size": s.get("group_size", 64), "bits": s.get("bits", 4), "mode": s.get("mode", "affine")}

    def pop(self, name: str) -> mx.array:
        try:
            return self.w.pop(name)
        except KeyError:
            raise WeightsError(f"checkpoint is missing tensor '{name}'; the checkpoint is incomplete") from None

    def quantized(self, path: str) -> bool:
        return f"{path}.scales" in self.w

    def dense(self, path: str) -> mx.array:
        """The module's weight as a float array, dequantized if stored quantized."""
        w = self.pop(f"{path}.weight")
        if not self.quantized(path):
            return w
        scales = self.pop(f"{path}.scales")
        biases = self.w.pop(f"{path}.biases", None)
        return mx.dequantize(w, scales, biases, **self.spec(path))

    def parts(self, path: str) -> dict[str, mx.array]:
        return {k: self.pop(f"{path}.{k}") for k in ("weight", "scales", "biases") if f"{path}.{k}" in self.w}


def _kda(r: _Reader, a: str, out: dict, quant: dict) -> None:
    paths = [a + f"{x}_proj" for x in "qkv"]
    specs = [r.spec(p) if r.quantized(p) else None for p in paths]
    if specs[0] is not None and specs.count(specs[0]) == 3:
        parts = [r.parts(p) for p in paths]
        for k in parts[0]:
            out[f"{a}qkv_proj.{k}"] = mx.concatenate([p[k] for p in parts], axis=0)
        quant[a + "qkv_proj"] = specs[0]
    else:
        out[a + "qkv_proj.weight"] = mx.concatenate([r.dense(p) for p in paths], axis=0)
    convs = [r.pop(a + f"{x}_conv.conv.weight") for x in "qkv"]  # [P, K, 1]
    out[a + "conv_weight"] = stacked_conv_weight(convs)
    out[a + "A_log"] = r.pop(a + "A_log").reshape(-1)
    out[a + "dt_bias"] = r.pop(a + "dt_bias").reshape(-1)
    out[a + "o_norm_weight"] = r.pop(a + "o_norm.weight")


def _mla(r: _Reader, cfg: ModelConfig, a: str, out: dict) -> None:
    if f"{a}embed_q.weight" in r.w:
        out[a + "k_up"] = r.dense(a + "embed_q").swapaxes(-1, -2)
        out[a + "v_up"] = r.dense(a + "unembed_out")
        return
    kv_b = r.dense(a + "kv_b_proj").reshape(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, -1)
    out[a + "k_up"] = kv_b[:, : cfg.qk_nope_head_dim]
    out[a + "v_up"] = kv_b[:, cfg.qk_nope_head_dim:]


def _rename(name: str) -> str:
    for old, new in RENAMES:
        name = name.replace(old, new)
    return name


def mlx_lm_to_local(cfg: ModelConfig, weights: dict) -> tuple[dict, ModelConfig]:
    """(local-name weights, cfg with the quantization block translated to local module paths)."""
    q = dict(cfg.quantization or {})
    r = _Reader(dict(weights), q)
    out: dict[str, mx.array] = {}
    quant: dict[str, dict] = {}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        if cfg.layer_types[i] == KDA:
            _kda(r, a, out, quant)
        else:
            _mla(r, cfg, a, out)
        if f"{p}mlp.gate.weight" in r.w:
            out[p + "mlp.gate.weight"] = r.dense(p + "mlp.gate")
            bias = p + "mlp.e_score_correction_bias"
            out[p + "mlp.gate.e_score_correction_bias"] = r.pop(bias if bias in r.w else bias.replace("mlp.", "mlp.gate."))
    for name in list(r.w):
        out[_rename(name)] = r.w.pop(name)
    for path, spec in q.items():
        if path not in GLOBAL_KEYS and isinstance(spec, dict) and f"{_rename(path)}.scales" in out:
            quant[_rename(path)] = r.spec(path)
    new_q = {k: q[k] for k in GLOBAL_KEYS if k in q}
    new_q.update(quant)
    return out, replace(cfg, quantization=new_q or None)
