"""load_model on checkpoints converted by mlx-lm's kimi_linear (the mlx-community layout), made by running
mlx-lm's own conversion code path on a tiny HF checkpoint, offline."""

import copy
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

import hf_oracle
from convert_helpers import TOKENS, logits, make_source
from kimi_mlx import load_model


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_source(tmp_path_factory.mktemp("src"))


def _mlx_lm_convert(src: Path, out: Path, **quant) -> Path:
    """mlx-lm's own conversion code path (load + sanitize, quantize_model, save), offline."""
    from mlx_lm.utils import load_model as lm_load, quantize_model, save_config, save_model

    model, config = lm_load(src, lazy=True, model_config={"rope_theta": 10000.0})  # transformers 5 omits it
    if quant:
        model, config = quantize_model(model, config, **quant)
    save_model(out, model)
    save_config(config, out / "config.json")
    return out


def _affine_embedding(path, module):
    """mxfp4 with an affine embedding (an fp-mode embedding returns bfloat16 and this test runs float32)."""
    return {"group_size": 64, "bits": 8, "mode": "affine"} if path.endswith(("mlp.gate", "embed_tokens")) else True


@pytest.mark.parametrize("quant", [{}, dict(group_size=64, bits=4),
                                   dict(group_size=32, bits=4, mode="mxfp4", quant_predicate=_affine_embedding),
                                   dict(group_size=64, bits=None, quant_predicate="mixed_3_6")],
                         ids=["float", "affine4", "mxfp4", "mixed_3_6"])
def test_mlx_lm_layout_loads_and_matches(source, tmp_path, quant):
    from mlx_lm.convert import mixed_quant_predicate_builder
    from mlx_lm.utils import load_model as lm_load

    torch_model, src = source
    if isinstance(quant.get("quant_predicate"), str):
        model, _ = lm_load(src, lazy=True, model_config={"rope_theta": 10000.0})
        quant["quant_predicate"] = mixed_quant_predicate_builder(quant["quant_predicate"], model, 64)
    path = _mlx_lm_convert(src, tmp_path / "lm", **quant)
    ours = logits(load_model(path))
    if not quant:
        ref = hf_oracle.logits(torch_model, np.array(TOKENS))[0]
    else:
        theirs, _ = lm_load(path, model_config={"rope_theta": 10000.0})
        ref = np.array(theirs(TOKENS))[0]
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_first_mlx_lm_port_layout_loads(source, tmp_path):
    """The first mlx-lm port's names: kv_a_proj, kv_a_norm, kv_b_proj kept whole (quantized), A_log [H]."""
    torch_model, src = source
    path = _mlx_lm_convert(src, tmp_path / "lm")
    f = path / "model.safetensors"
    w = mx.load(str(f))
    hf = mx.load(str(src / "model.safetensors"))
    a = "model.layers.3.self_attn."
    del w[a + "embed_q.weight"], w[a + "unembed_out.weight"]
    w[a + "kv_b_proj.weight"], w[a + "kv_b_proj.scales"], w[a + "kv_b_proj.biases"] = mx.quantize(
        hf[a + "kv_b_proj.weight"], 64, 8)
    w = {k.replace("kv_a_proj_with_mqa", "kv_a_proj").replace("kv_a_layernorm", "kv_a_norm"): v for k, v in w.items()}
    w = {k: v.reshape(-1) if k.endswith("A_log") else v for k, v in w.items()}
    mx.save_safetensors(str(f), w)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization"] = {"group_size": 64, "bits": 8}
    (path / "config.json").write_text(json.dumps(cfg))
    rounded = copy.deepcopy(torch_model)  # the reference with kv_b_proj as stored: 8-bit round trip
    kv_b = mx.dequantize(*(w[a + f"kv_b_proj.{k}"] for k in ("weight", "scales", "biases")), 64, 8)
    with torch.no_grad():
        rounded.model.layers[3].self_attn.kv_b_proj.weight.copy_(torch.from_numpy(np.array(kv_b)))
    ref = hf_oracle.logits(rounded, np.array(TOKENS))[0]
    assert np.abs(logits(load_model(path)) - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("quant", [dict(group_size=64, bits=4), dict(group_size=64, bits=None,
                                                                        quant_predicate="mixed_3_6")],
                         ids=["affine4", "mixed_3_6"])
def test_mlx_lm_layout_streams_its_experts(source, tmp_path, quant):
    """--experts-memory on an mlx-lm checkpoint (switch_mlp banks; mixed_3_6: layers of different bits): the same
    logits as resident, the experts read from the banks' slices."""
    from mlx_lm.convert import mixed_quant_predicate_builder
    from mlx_lm.utils import load_model as lm_load

    from kimi_mlx.weights.expert_files import ExpertFiles
    from kimi_mlx.weights.load import weight_files

    _, src = source
    if isinstance(quant.get("quant_predicate"), str):
        model, _ = lm_load(src, lazy=True, model_config={"rope_theta": 10000.0})
        quant["quant_predicate"] = mixed_quant_predicate_builder(quant["quant_predicate"], model, 64)
    path = _mlx_lm_convert(src, tmp_path / "lm", **quant)
    files = ExpertFiles(weight_files(path))
    experts = sum(t.end - t.begin for name, t in files.tensors.items() if ".switch_mlp." in name)
    assert experts > 0
    streamed = load_model(path, experts_memory_gb=experts * 0.6 / 1e9)
    assert streamed.offload is not None and streamed.offload.slots < streamed.config.num_experts
    assert np.array_equal(logits(streamed), logits(load_model(path)))
