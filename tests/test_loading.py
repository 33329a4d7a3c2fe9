"""Checkpoint loading: sharded HF checkpoints, dtypes, the demo, and one-line errors for bad files."""

import json
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import hf_oracle
from kimi_mlx import load_model
from kimi_mlx.errors import KimiError, WeightsError


def test_sharded_checkpoint_loads(tmp_path, hf_checkpoint):
    torch_model, _ = hf_checkpoint("kkkm")
    torch_model.save_pretrained(str(tmp_path), max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    toks = np.arange(30)[None] % 200
    ref = hf_oracle.logits(torch_model, toks)
    out = np.array(load_model(tmp_path)(mx.array(toks)))
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()


def test_bf16_checkpoint_keeps_sensitive_tensors_fp32(tmp_path, hf_checkpoint):
    torch_model, path = hf_checkpoint("kkkm")
    model = load_model(path, dtype=mx.bfloat16)
    attn = model.model.layers[0].self_attn
    assert attn.qkv_proj.weight.dtype == mx.bfloat16
    assert attn.A_log.dtype == mx.float32 and attn.dt_bias.dtype == mx.float32
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == mx.float32


@pytest.fixture
def ckpt_copy(tmp_path, hf_checkpoint):
    _, src = hf_checkpoint("kkkm")
    dst = tmp_path / "ck"
    shutil.copytree(src, dst)
    return dst


def one_line(exc):
    """One line, not a dump: the path, our sentence and the library's whole first line (~300 characters)."""
    return "\n" not in str(exc.value) and len(str(exc.value)) < 400


def test_missing_directory():
    with pytest.raises(WeightsError) as e:
        load_model("/no/such/dir")
    assert one_line(e)


def test_missing_weights(ckpt_copy):
    (ckpt_copy / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no \\*.safetensors") as e:
        load_model(ckpt_copy)
    assert one_line(e)


def test_truncated_weights(ckpt_copy):
    f = ckpt_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(WeightsError, match="truncated or corrupt") as e:
        load_model(ckpt_copy)
    assert one_line(e)


def test_garbage_weights(ckpt_copy):
    (ckpt_copy / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        load_model(ckpt_copy)


def test_missing_tensor_is_named(ckpt_copy):
    from safetensors.numpy import load_file, save_file

    w = load_file(str(ckpt_copy / "model.safetensors"))
    del w["model.layers.3.self_attn.o_proj.weight"]
    save_file(w, str(ckpt_copy / "model.safetensors"))
    with pytest.raises(WeightsError, match="model.layers.3.self_attn.o_proj.weight") as e:
        load_model(ckpt_copy)
    assert one_line(e)


def test_config_weights_mismatch(ckpt_copy):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["hidden_size"] = 64
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="shape") as e:
        load_model(ckpt_copy)
    assert one_line(e)


def test_index_names_missing_shard(tmp_path, hf_checkpoint):
    torch_model, _ = hf_checkpoint("kkkm")
    torch_model.save_pretrained(str(tmp_path), max_shard_size="100KB")
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(WeightsError, match="missing"):
        load_model(tmp_path)


def test_bad_config_is_kimi_error(ckpt_copy):
    (ckpt_copy / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(KimiError, match="model_type"):
        load_model(ckpt_copy)


def test_demo_loads_and_is_deterministic():
    a = load_model("demo-random")
    b = load_model("demo-random")
    toks = mx.array([[1, 2, 3, 4, 5]])
    assert np.array_equal(np.array(a(toks)), np.array(b(toks)))
    assert a.config.num_experts == 16 and a.config.layer_types == ["kda", "kda", "kda", "mla"]


def test_cli_errors_are_one_line(tmp_path):
    import os

    # a fresh TMPDIR: MLX's kernel cache empty, and still no note before the error (nothing will be compiled)
    r = subprocess.run([sys.executable, "-m", "kimi_mlx", "generate", "--model", str(tmp_path / "nope")],
                       capture_output=True, text=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert r.returncode != 0
    lines = [l for l in r.stderr.strip().splitlines() if l]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr


def test_cli_demo_prints_tokens():
    r = subprocess.run([sys.executable, "-m", "kimi_mlx", "generate", "--model", "demo-random", "--prompt", "hi",
                        "--max-tokens", "8", "--seed", "0"], capture_output=True, text=True)  # unseeded: EOS can come first
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "random weights" in r.stderr


@pytest.mark.parametrize("command", [["generate", "--model", "demo", "--max-tokens", "2"], ["doctor"],
                                     ["bench", "--no-peer", "--contexts", "64", "--prefill", "32"]])
def test_first_run_says_it_compiles_before_the_wait(tmp_path, command):
    """With MLX's CPU kernel cache empty (a fresh TMPDIR) the CLI says so on stderr before the first compile
    (which takes half a minute or more); the process is stopped once it has said it."""
    import os
    import time

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "kimi_mlx", *command],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = p.stderr.readline()
        took = time.monotonic() - t0
    finally:
        p.kill()
        p.wait()
    assert line.startswith(f"first run of MLX {mx.__version__} here: compiling its CPU kernels into "
                           f"{tmp_path / 'mlx' / mx.__version__ / 'cpu'}"), line
    assert took < 5, took  # ~0.5 s on an idle 2-core machine: imports only, nothing compiled or loaded yet


def test_cold_cache_is_told_once_and_a_warm_one_never(tmp_path, monkeypatch, capsys):
    from kimi_mlx import loading

    for k in ("TMP", "TEMP", "TEMPDIR"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(loading, "_told_cold", False)
    cache = loading.mlx_cpu_kernel_dir()
    assert cache == tmp_path / "mlx" / mx.__version__ / "cpu"
    cache.mkdir(parents=True)
    (cache / "kernel.cpp").write_text("")  # sources are written before the build: still cold
    assert loading.tell_if_cold_cache() and not loading.tell_if_cold_cache()
    assert capsys.readouterr().err.count("compiling its CPU kernels") == 1
    monkeypatch.setattr(loading, "_told_cold", False)
    (cache / "libkernel.so").write_text("")
    assert not loading.tell_if_cold_cache() and capsys.readouterr().err == ""


def test_cold_cuda_cache_is_told_once_and_a_warm_one_never(tmp_path, monkeypatch, capsys):
    """On CUDA the notice reads MLX's PTX cache ($MLX_PTX_CACHE_DIR, else its temp directory's ptx): silent once a
    compiled kernel's .ptx is there, however deep (MLX nests long kernel names in directories)."""
    from kimi_mlx import loading

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.delenv("MLX_PTX_CACHE_DIR", raising=False)
    assert loading.mlx_cuda_kernel_dir() == tmp_path / "mlx" / mx.__version__ / "ptx"
    cache = tmp_path / "ptx-cache"
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(cache))
    assert loading.mlx_cuda_kernel_dir() == cache
    monkeypatch.setattr(loading, "_told_cold", False)
    assert loading.tell_if_cold_cache("cuda") and not loading.tell_if_cold_cache("cuda")
    err = capsys.readouterr().err
    assert err.count("compiling its CUDA kernels into " + str(cache)) == 1 and "minutes" in err
    monkeypatch.setattr(loading, "_told_cold", False)
    (cache / "long_name").mkdir(parents=True)
    (cache / "long_name" / "rest_of_it.ptx").write_text("")
    assert not loading.tell_if_cold_cache("cuda") and capsys.readouterr().err == ""
    monkeypatch.setattr(loading, "_told_cold", False)
    assert not loading.tell_if_cold_cache("metal")  # Metal's compiles take moments: nothing to say


def test_a_library_error_is_passed_on_whole(monkeypatch):
    """A wrapped library error keeps its whole first line (its advice often ends it), never a fixed cut."""
    import huggingface_hub

    from kimi_mlx.loading import resolve

    advice = ("Cannot find an appropriate cached snapshot folder for the specified revision on the local disk and "
              "outgoing traffic has been disabled. To enable repo look-ups and downloads online, set "
              "'HF_HUB_OFFLINE=0' as environment variable.")

    def fail(*a, **k):
        raise RuntimeError(advice + "\nsecond line")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(KimiError) as e:
        resolve("someone/no-such-repo")
    assert str(e.value).endswith(f"({advice})")
