"""Config parsing: both layouts agree; bad configs fail with one line naming the field."""

import copy
import json

import pytest

from kimi_mlx.config import DENSE, KDA, KIMI_LINEAR_48B_A3B, MLA, MOE, ModelConfig
from kimi_mlx.errors import ConfigError

MOONSHOT = copy.deepcopy(KIMI_LINEAR_48B_A3B)


def native_layout(d):
    """The same model in transformers' native field names."""
    n = dict(d)
    lin = n.pop("linear_attn_config")
    types = ["linear_attention" if i + 1 in lin["kda_layers"] else "full_attention" for i in range(27)]
    n.update(layer_types=types, linear_num_heads=32, linear_head_dim=128, linear_conv_kernel_dim=4,
             num_local_experts=n.pop("num_experts"), num_experts_per_tok=n.pop("num_experts_per_token"),
             n_shared_experts=n.pop("num_shared_experts"), n_group=n.pop("num_expert_group"),
             norm_topk_prob=n.pop("moe_renormalize"), max_position_embeddings=n.pop("model_max_length"),
             mlp_layer_types=["dense"] + ["sparse"] * 26)
    del n["first_k_dense_replace"], n["moe_layer_freq"]
    return n


def test_real_config_layer_map():
    c = ModelConfig.from_dict(MOONSHOT)
    assert c.layer_types.count(KDA) == 20 and c.layer_types.count(MLA) == 7
    assert [i for i, t in enumerate(c.layer_types) if t == MLA] == [3, 7, 11, 15, 19, 23, 26]
    assert c.mlp_types[0] == DENSE and c.mlp_types[1:] == [MOE] * 26
    assert c.latent_dim == 576 and c.qk_head_dim == 192 and c.eos_token_ids == [163586]
    assert c.latent_norm_eps == 1e-6


def test_both_layouts_agree():
    assert ModelConfig.from_dict(MOONSHOT) == ModelConfig.from_dict(native_layout(MOONSHOT))


def test_round_trip_own_layout():
    c = ModelConfig.from_dict(MOONSHOT)
    assert ModelConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def bad(**changes):
    d = json.loads(json.dumps(MOONSHOT))
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    return d


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(model_type="llama"), "model_type"),
        (dict(vocab_size=None), "vocab_size"),
        (dict(hidden_size="big"), "hidden_size"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
        (dict(linear_attn_config=None), "linear_attn_config"),
        (dict(num_experts_per_token=300), "num_experts_per_token"),
        (dict(num_expert_group=3), "num_expert_group"),
        (dict(topk_group=2), "topk_group"),
        (dict(q_lora_rank=1536), "q_lora_rank"),
        (dict(mla_use_nope=False), "mla_use_nope"),
        (dict(rms_norm_eps="x"), "rms_norm_eps"),
        (dict(layer_types=["linear_attention"] * 3), "layer_types"),
    ],
)
def test_bad_config_names_the_field(changes, field):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(bad(**changes))
    msg = str(e.value)
    assert field in msg and "\n" not in msg


def test_overlapping_and_out_of_range_layers():
    d = bad()
    d["linear_attn_config"]["full_attn_layers"] = [3, 4, 8, 12, 16, 20, 24, 27]
    with pytest.raises(ConfigError, match="both"):
        ModelConfig.from_dict(d)
    d = bad()
    d["linear_attn_config"]["full_attn_layers"] = [4, 8, 12, 16, 20, 24, 28]
    with pytest.raises(ConfigError, match="1..27"):
        ModelConfig.from_dict(d)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path)
