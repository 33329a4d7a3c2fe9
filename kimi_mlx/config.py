"""One typed model config, read from either config.json layout (Moonshot or transformers-native)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ConfigError


KDA, MLA = "kda", "mla"
DENSE, MOE = "dense", "moe"


# The published config.json of moonshotai/Kimi-Linear-48B-A3B-Instruct (the fields that matter here).
KIMI_LINEAR_48B_A3B = {
    "model_type": "kimi_linear", "vocab_size": 163840, "hidden_size": 2304, "num_hidden_layers": 27,
    "intermediate_size": 9216, "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 72,
    "kv_lora_rank": 512, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "mla_use_nope": True, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
    "linear_attn_config": {
        "kda_layers": [1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26],
        "full_attn_layers": [4, 8, 12, 16, 20, 24, 27], "num_heads": 32, "head_dim": 128,
        "short_conv_kernel_size": 4,
    },
    "num_experts": 256, "num_experts_per_token": 8, "num_shared_experts": 1, "moe_intermediate_size": 1024,
    "first_k_dense_replace": 1, "moe_layer_freq": 1, "moe_renormalize": True, "routed_scaling_factor": 2.446,
    "use_grouped_topk": True, "num_expert_group": 1, "topk_group": 1, "moe_router_activation_func": "sigmoid",
    "bos_token_id": 163584, "eos_token_id": 163586, "pad_token_id": 163839, "model_max_length": 1048576,
    "tie_word_embeddings": False,
}


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    layer_types: list[str]  # per layer: "kda" or "mla"
    mlp_types: list[str]  # per layer: "dense" or "moe"
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    # MLA (no positional encoding)
    num_attention_heads: int = 32
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    latent_norm_eps: float = 1e-6  # upstream builds kv_a_layernorm with the class default
    # KDA
    kda_num_heads: int = 32
    kda_head_dim: int = 128
    conv_kernel_size: int = 4
    # MoE
    num_experts: int = 0
    num_experts_per_token: int = 8
    num_shared_experts: int = 0
    moe_intermediate_size: int = 1024
    routed_scaling_factor: float = 1.0
    moe_renormalize: bool = True
    num_expert_group: int = 1
    topk_group: int = 1
    router_bias_in_weights: bool = False  # True = HF remote-code semantics (bias also enters weights)
    # tokens and limits
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    max_position_embeddings: int = 1048576
    model_type: str = "kimi_linear"
    quantization: dict | None = None

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return _parse(d)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"{path}: config.json not found; point at a Kimi Linear checkpoint directory")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e}); re-download or re-convert the checkpoint")
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return _parse(d)

    def to_dict(self) -> dict:
        """This project's layout; from_dict reads it back."""
        return asdict(self)


def _get(d: dict, *names, default=None, required=False):
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    if required:
        raise ConfigError(f"config.json: missing field '{names[0]}'")
    return default


def _int(d, *names, default=None, required=False, minimum=0):
    v = _get(d, *names, default=default, required=required)
    if v is None:
        return v
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"config.json: field '{names[0]}' must be an integer >= {minimum}, got {v!r}")
    return v


def _float(d, *names, default=None):
    v = _get(d, *names, default=default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"config.json: field '{names[0]}' must be a number, got {v!r}")
    return float(v)


def _layer_types(d: dict, n: int) -> list[str]:
    if d.get("layer_types") is not None:
        lt = d["layer_types"]
        names = {"linear_attention": KDA, "full_attention": MLA, KDA: KDA, MLA: MLA}
        if not isinstance(lt, list) or len(lt) != n or any(t not in names for t in lt):
            raise ConfigError(
                f"config.json: field 'layer_types' must list {n} entries of linear_attention/full_attention"
            )
        return [names[t] for t in lt]
    lin = d.get("linear_attn_config")
    if not isinstance(lin, dict) or "kda_layers" not in lin or "full_attn_layers" not in lin:
        raise ConfigError("config.json: missing field 'linear_attn_config' (with kda_layers and full_attn_layers)")
    types: list[str | None] = [None] * n
    for key, kind in (("kda_layers", KDA), ("full_attn_layers", MLA)):
        layers = lin[key]
        if not isinstance(layers, list):
            raise ConfigError(f"config.json: field 'linear_attn_config.{key}' must be a list of 1-based layer numbers")
        for i in layers:
            if isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= n:
                raise ConfigError(
                    f"config.json: field 'linear_attn_config.{key}' has layer {i!r}; layers are numbered 1..{n}"
                )
            if types[i - 1] is not None:
                raise ConfigError(f"config.json: layer {i} is in both kda_layers and full_attn_layers")
            types[i - 1] = kind
    missing = [i + 1 for i, t in enumerate(types) if t is None]
    if missing:
        raise ConfigError(f"config.json: field 'linear_attn_config' assigns no attention type to layers {missing}")
    return types  # type: ignore[return-value]


def _mlp_types(d: dict, n: int, has_experts: bool) -> list[str]:
    mt = _get(d, "mlp_layer_types", "mlp_types")
    if mt is not None:
        names = {"dense": DENSE, "sparse": MOE, MOE: MOE}
        if not isinstance(mt, list) or len(mt) != n or any(t not in names for t in mt):
            raise ConfigError(f"config.json: field 'mlp_layer_types' must list {n} entries of dense/sparse")
        types = [names[t] for t in mt]
    else:
        first_dense = _int(d, "first_k_dense_replace", default=0)
        freq = _int(d, "moe_layer_freq", default=1, minimum=1)
        types = [MOE if has_experts and i >= first_dense and i % freq == 0 else DENSE for i in range(n)]
    if MOE in types and not has_experts:
        raise ConfigError("config.json: MoE layers are configured but field 'num_experts' is missing or 0")
    return types


def _parse(d: dict) -> ModelConfig:
    mt = d.get("model_type")
    if mt not in ("kimi_linear", None):
        raise ConfigError(f"config.json: model_type is '{mt}', not 'kimi_linear'; this tool runs Kimi Linear only")
    n = _int(d, "num_hidden_layers", required=True, minimum=1)
    lin = d.get("linear_attn_config") or {}
    num_experts = _int(d, "num_experts", "num_local_experts", "n_routed_experts", default=0)
    eos = _get(d, "eos_token_ids", "eos_token_id", default=[])
    eos = [eos] if isinstance(eos, int) else list(eos)
    cfg = ModelConfig(
        vocab_size=_int(d, "vocab_size", required=True, minimum=1),
        hidden_size=_int(d, "hidden_size", required=True, minimum=1),
        num_hidden_layers=n,
        intermediate_size=_int(d, "intermediate_size", default=0),
        layer_types=_layer_types(d, n),
        mlp_types=_mlp_types(d, n, num_experts > 0),
        rms_norm_eps=_float(d, "rms_norm_eps", default=1e-5),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        num_attention_heads=_int(d, "num_attention_heads", default=32, minimum=1),
        kv_lora_rank=_int(d, "kv_lora_rank", default=512, minimum=1),
        qk_nope_head_dim=_int(d, "qk_nope_head_dim", default=128, minimum=1),
        qk_rope_head_dim=_int(d, "qk_rope_head_dim", default=64),
        v_head_dim=_int(d, "v_head_dim", default=128, minimum=1),
        latent_norm_eps=_float(d, "latent_norm_eps", default=1e-6),
        kda_num_heads=_int(lin, "num_heads", default=_get(d, "kda_num_heads", "linear_num_heads", default=32), minimum=1),
        kda_head_dim=_int(lin, "head_dim", default=_get(d, "kda_head_dim", "linear_head_dim", default=128), minimum=1),
        conv_kernel_size=_int(
            lin, "short_conv_kernel_size",
            default=_get(d, "conv_kernel_size", "linear_conv_kernel_dim", default=4), minimum=1,
        ),
        num_experts=num_experts,
        num_experts_per_token=_int(d, "num_experts_per_token", "num_experts_per_tok", default=8, minimum=1),
        num_shared_experts=_int(d, "num_shared_experts", "n_shared_experts", default=0),
        moe_intermediate_size=_int(d, "moe_intermediate_size", default=1024),
        routed_scaling_factor=_float(d, "routed_scaling_factor", default=1.0),
        moe_renormalize=bool(_get(d, "moe_renormalize", "norm_topk_prob", default=True)),
        num_expert_group=_int(d, "num_expert_group", "n_group", default=1, minimum=1),
        topk_group=_int(d, "topk_group", default=1, minimum=1),
        router_bias_in_weights=bool(d.get("router_bias_in_weights", False)),
        bos_token_id=_get(d, "bos_token_id"),
        eos_token_ids=eos,
        pad_token_id=_get(d, "pad_token_id"),
        max_position_embeddings=_int(d, "max_position_embeddings", "model_max_length", default=1048576, minimum=1),
        quantization=d.get("quantization"),
    )
    _check(cfg, d)
    return cfg


def _check(c: ModelConfig, d: dict) -> None:
    if d.get("q_lora_rank") is not None:
        raise ConfigError("config.json: field 'q_lora_rank' must be null; Kimi Linear's MLA has a plain q_proj")
    if d.get("mla_use_nope") is False:
        raise ConfigError("config.json: field 'mla_use_nope' is false; Kimi Linear's MLA uses no positional encoding")
    if c.num_experts:
        if c.num_experts_per_token > c.num_experts:
            raise ConfigError(
                f"config.json: field 'num_experts_per_token' ({c.num_experts_per_token}) exceeds num_experts ({c.num_experts})"
            )
        if c.num_experts % c.num_expert_group:
            raise ConfigError(
                f"config.json: field 'num_expert_group' ({c.num_expert_group}) must divide num_experts ({c.num_experts})"
            )
        if c.topk_group > c.num_expert_group:
            raise ConfigError(f"config.json: field 'topk_group' ({c.topk_group}) exceeds num_expert_group")
        per_group = c.num_experts // c.num_expert_group
        if c.num_expert_group > 1 and per_group < 2:
            raise ConfigError("config.json: field 'num_expert_group' leaves fewer than 2 experts per group")
        if c.topk_group * per_group < c.num_experts_per_token:
            raise ConfigError("config.json: field 'topk_group' keeps fewer experts than num_experts_per_token")
        if c.moe_intermediate_size < 1:
            raise ConfigError("config.json: field 'moe_intermediate_size' must be >= 1")
    if DENSE in c.mlp_types and c.intermediate_size < 1:
        raise ConfigError("config.json: field 'intermediate_size' must be >= 1 for dense MLP layers")
