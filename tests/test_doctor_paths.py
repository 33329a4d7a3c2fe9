"""`kimi-mlx doctor --model M`: the paths a loaded model's layers take, per layer kind, and why a kernel does
not take a layer (a quantization it does not read, a kernel switched off at load)."""

import mlx.nn as nn
import pytest

import metal_kernels
from kimi_mlx import cli, doctor, load_model
from kimi_mlx.model import fuse
from kimi_mlx.model.fuse import fuse_model
from kimi_mlx.ops import kda as kda_ops

SHAPE = dict(layers="kkm", kda_dim=32, hidden_size=64, moe_intermediate_size=32, num_local_experts=32,
             intermediate_size=64, num_attention_heads=8, num_key_value_heads=8, kv_lora_rank=32, v_head_dim=16)


def quantized(path, expert_bits):
    """The tiny checkpoint at 8 bits, its experts (routed and shared) at expert_bits, as a mixed recipe can write them."""
    model = load_model(path, fuse=False)
    nn.quantize(model, class_predicate=lambda p, m: hasattr(m, "to_quantized") and (
        {"bits": expert_bits, "group_size": 32} if "experts." in p else {"bits": 8, "group_size": 32}))
    fuse_model(model)
    return model


def test_the_demo_paths_on_the_cpu(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["kimi-mlx", "doctor", "--model", "demo"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "model KDA attention, layers 0-2, 4-6: decode: fused ops; prefill: chunked, ops" in out
    assert "model MLA attention, layers 3, 7: decode: matmuls" in out
    assert "model FFN, layer 0: dense FFN, 8-bit affine gs64" in out
    assert "model FFN, layers 1-7: MoE decode: gather expert matmuls; prefill: segmented" in out
    assert "model switched off: none" in out


def test_a_model_that_is_not_there_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["kimi-mlx", "doctor", "--model", "/nonexistent/model"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(err) == 1 and err[0].startswith("error: /nonexistent/model: no such")


@pytest.mark.parametrize("expert_bits", [4, 6])
def test_a_quantization_the_kernels_do_not_read_is_named(hf_checkpoint, monkeypatch, expert_bits):
    model = quantized(hf_checkpoint(**SHAPE)[1], expert_bits)
    monkeypatch.setattr(kda_ops, "gpu_backend", lambda: "metal")
    monkeypatch.setattr(fuse, "gpu_backend", lambda: "metal")
    monkeypatch.setattr(metal_kernels, "_off", {})
    rows = dict(doctor.model_paths(model))
    assert rows["KDA attention, layers 0-1"].startswith("decode: one metal kernel, f_b and g_b inside; prefill: "
                                                         "chunked: per-chunk matrices as a metal kernel")
    assert rows["MLA attention, layer 2"].startswith("decode: two metal kernels over a page of <= 8,192 rows, "
                                                     "matmuls around two metal kernels (flash decoding) beyond")
    moe = rows["FFN, layer 1"] if "FFN, layer 1" in rows else rows["FFN, layers 1-2"]
    if expert_bits == 4:
        assert moe.startswith("MoE decode: metal kernels;")
    else:  # 6-bit banks: the decode kernels read 2/4/8-bit only, and the row says so
        assert moe.startswith("MoE decode: gather expert matmuls (the gate|up bank is 6-bit affine (the kernels read "
                              "affine 2/4/8-bit))")
    metal_kernels.switch_off("kda_decode_gates", "Unable to build metal library from source")
    rows = dict(doctor.model_paths(model))
    assert rows["KDA attention, layers 0-1"].startswith("decode: metal kernel, f_b and g_b as matmuls before it (its "
                                                         "gates kernel is switched off)")
    assert rows["switched off"] == "kda_decode_gates (Unable to build metal library from source)"
