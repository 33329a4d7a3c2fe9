"""`kimi-mlx convert`: tiny HF checkpoints converted in every mode and recipe, loaded and compared with
the source; bad inputs; interrupted runs; --force. (mlx-lm-converted layouts: test_mlx_lm_layout.py.)"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import hf_oracle
from convert_helpers import TOKENS, kl, logits, make_source
from kimi_mlx import load_model
from kimi_mlx.config import ModelConfig
from kimi_mlx.errors import KimiError
from kimi_mlx.model.fuse import FusedMoE
from kimi_mlx.weights import output
from kimi_mlx.weights.convert import ConvertOptions, convert, quant_plan
from kimi_mlx.weights.recipes import make_recipe

REPO = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_source(tmp_path_factory.mktemp("src"))


def run(src, out, *args, report=False, **kw):
    flags = dict(zip(("bits", "group_size", "mode", "recipe"), args))
    return convert(str(src), out, ConvertOptions(**flags, report=report, **kw), log=lambda _: None)


def twin(src: Path, *args, overrides=()):
    """The straightforward path the streaming converter must equal: load the whole source, quantize it."""
    cfg = ModelConfig.from_file(src)
    args = list(args) + [None] * (4 - len(args))
    plan, _ = quant_plan(cfg, make_recipe(*args, overrides=list(overrides)))
    model = load_model(src, fuse=False)
    nn.quantize(model, class_predicate=lambda p, m: plan[p].to_dict() if p in plan else False)
    return model, plan


def test_unquantized_float32_matches_source(source, tmp_path):
    torch_model, src = source
    out = tmp_path / "f32"
    res = run(src, out, dtype="float32")
    ref = hf_oracle.logits(torch_model, np.array(TOKENS))[0]
    got = logits(load_model(out))
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization" not in cfg and cfg["max_position_embeddings"] == 1048576
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert shards == [f"model-{k:05d}-of-{res.shards:05d}.safetensors" for k in range(1, res.shards + 1)]
    assert set(index["weight_map"].values()) == set(shards)
    for f in ("tiktoken.model", "tokenizer_config.json", "generation_config.json", "README.md"):
        assert (out / f).is_file(), f
    assert str(src) in (out / "README.md").read_text()


def test_bf16_keeps_sensitive_tensors_fp32(source, tmp_path):
    _, src = source
    run(src, tmp_path / "bf16", dtype="bfloat16")
    w = mx.load(str(next((tmp_path / "bf16").glob("model-00002-*.safetensors"))))  # layer 0 (KDA)
    a = "model.layers.0.self_attn."
    for name in ("A_log", "dt_bias", "conv_weight", "o_norm_weight"):
        assert w[a + name].dtype == mx.float32, name
    assert w[a + "qkv_proj.weight"].dtype == mx.bfloat16
    w = mx.load(str(next((tmp_path / "bf16").glob("model-00003-*.safetensors"))))  # layer 1 (MoE)
    assert w["model.layers.1.mlp.gate.weight"].dtype == mx.float32  # the router is never down-cast
    assert w["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == mx.float32
    ref = logits(load_model(src))
    got = logits(load_model(tmp_path / "bf16", dtype=mx.float32))  # float32 compute: the weights' rounding alone
    # bf16 rounding is RMS 0.11% of a weight, 1/5 of 8-bit gs64's 0.54%; KL grows as the square: ~2e-4
    assert kl(ref, got).mean() <= 1e-3


def test_dtype_defaults_to_the_sources(source, tmp_path):
    """Without --dtype, unquantized weights and quantization scales keep the dtype the source is stored in
    (as mlx-lm does): a float32 source converts exactly as with --dtype float32 (no bfloat16 rounding before
    quantizing), a bfloat16 one stays bfloat16; an explicit --dtype wins."""
    import shutil

    _, src = source
    run(src, tmp_path / "default", 8)
    run(src, tmp_path / "f32", 8, dtype="float32")
    def layer0(out):
        return mx.load(str(next((tmp_path / out).glob("model-00002-*.safetensors"))))

    got, want = layer0("default"), layer0("f32")
    assert got.keys() == want.keys() and all(mx.array_equal(got[k], want[k]) for k in want)
    assert got["model.layers.0.self_attn.qkv_proj.scales"].dtype == mx.float32
    assert json.loads((tmp_path / "default" / "config.json").read_text())["dtype"] == "float32"

    half = tmp_path / "bf16src"
    shutil.copytree(src, half)
    w = mx.load(str(half / "model.safetensors"))
    mx.save_safetensors(str(half / "model.safetensors"), {k: v.astype(mx.bfloat16) for k, v in w.items()},
                        metadata={"format": "pt"})
    run(half, tmp_path / "from_bf16")
    run(half, tmp_path / "forced", dtype="float16")
    for out, dtype in (("from_bf16", mx.bfloat16), ("forced", mx.float16)):
        assert layer0(out)["model.layers.0.self_attn.qkv_proj.weight"].dtype == dtype, out


MODES = [(8, None, None, None), (6, None, None, None), (5, 128, None, None), (4, None, None, None),
         (3, 32, None, None), (2, None, None, None), (None, None, "mxfp4", None), (None, None, "mxfp8", None),
         (None, None, "nvfp4", None), (4, None, None, "uniform"), (None, None, None, "mixed_2_6"),
         (None, None, None, "mixed_3_4"), (None, None, None, "mixed_3_6"), (None, 32, None, "mixed_4_6")]


@pytest.mark.parametrize("args", MODES, ids=lambda a: "-".join(str(x) for x in a if x))
def test_quantized_equals_in_memory_twin(source, tmp_path, args):
    _, src = source
    run(src, tmp_path / "q", *args, dtype="float32")
    converted = load_model(tmp_path / "q")
    model, plan = twin(src, *args)
    ref = logits(model)
    assert np.abs(logits(converted) - ref).max() <= 1e-4 * np.abs(ref).max()
    q = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    for path, spec in plan.items():  # every module quantized as planned, none forgotten
        assert q.get(path, {k: q[k] for k in ("bits", "group_size", "mode")}) == spec.to_dict(), path
    if args[3] in (None, "uniform") and args[1] != 128:  # one spec for every expert bank: load-time fusion applies
        assert all(isinstance(layer.mlp, FusedMoE) for layer in converted.model.layers[1:])
    layer = load_model(tmp_path / "q", fuse=False).model.layers[1]
    assert layer.mlp.experts.gate_proj.weight.dtype == mx.uint32  # experts quantized
    if args[1] == 128:  # width 64 is not a multiple of the group size: kept in floating point
        assert layer.mlp.experts.down_proj.weight.dtype == mx.float32
    assert layer.mlp.gate.weight.dtype == mx.float32  # router unquantized
    if args[3] != "uniform":
        assert layer.self_attn.f_a_proj.bits == 8 and layer.self_attn.b_proj.bits == 8


def test_overrides_and_unquantized_modules(source, tmp_path):
    _, src = source
    res = run(src, tmp_path / "o", 4, dtype="float32",
              overrides=["*.experts.down_proj=6:32", "lm_head=none", "model.layers.3.*=mxfp8"])
    m = load_model(tmp_path / "o", fuse=False)
    assert m.model.layers[1].mlp.experts.down_proj.bits == 6 and m.model.layers[1].mlp.experts.down_proj.group_size == 32
    assert isinstance(m.lm_head, nn.Linear) and not isinstance(m.lm_head, nn.QuantizedLinear)
    assert m.model.layers[3].self_attn.q_proj.mode == "mxfp8"
    assert m.model.layers[0].self_attn.qkv_proj.bits == 4
    model, _ = twin(src, 4, overrides=["*.experts.down_proj=6:32", "lm_head=none", "model.layers.3.*=mxfp8"])
    assert np.abs(logits(load_model(tmp_path / "o")) - logits(model)).max() <= 1e-4 * np.abs(logits(model)).max()
    assert res.unquantized == []


def _noise_kl(src: Path, plan: dict, seeds=range(4)) -> float:
    """KL to the source of the source plus Gaussian noise as large as MLX's quantizer round-trip error,
    module by module: what a correct conversion's KL should look like."""
    base = load_model(src, fuse=False)
    ref = logits(base)
    out = []
    for seed in seeds:
        model = load_model(src, fuse=False)
        modules = dict(model.named_modules())
        mx.random.seed(seed)
        upd = []
        for path, spec in plan.items():
            w = modules[path].weight
            q = mx.quantize(w, spec.group_size, spec.bits, mode=spec.mode)
            err = mx.dequantize(*q[:2], q[2] if len(q) > 2 else None, spec.group_size, spec.bits, mode=spec.mode,
                                dtype=mx.float32) - w
            upd.append((path + ".weight", w + mx.sqrt(mx.mean(err * err)) * mx.random.normal(w.shape)))
        model.load_weights(upd, strict=False)
        out.append(kl(ref, logits(model)).mean())
    return float(np.mean(out))


@pytest.mark.parametrize("bits", [8, 4])
def test_kl_within_quantization_noise(source, tmp_path, bits):
    """Bound: a correct conversion perturbs the model like random noise of the quantizer's own error size.
    Tiny random models route chaotically (a small change flips experts), so absolute KLs are large here:
    5e-3 at 8 bits, 0.37 at 4 bits, 0.88 for an unrelated model. The converted model's KL must stay within
    2x of the noise-matched KL (measured ratios 0.77 and 1.08); a mapping, scale or config bug adds errors
    far above the quantizer's. Exactness against the in-memory twin is tested above."""
    _, src = source
    res = run(src, tmp_path / "q", bits, dtype="float32", report=True)
    got = kl(logits(load_model(src)), logits(load_model(tmp_path / "q"))).mean()
    noise = _noise_kl(src, twin(src, bits)[1])
    assert got <= 2 * noise, (got, noise)
    assert res.report.kl_mean <= 2 * noise
    assert {"experts", "kda_gates", "kda_attn", "mla_attn", "embed", "lm_head"} <= set(res.report.classes)


def test_report_matches_full_models(source, tmp_path):
    """The streaming report (one group of each model at a time) against whole models on the same prompt."""
    _, src = source
    res = run(src, tmp_path / "q", 4, dtype="float32", report=True)
    from kimi_mlx.weights.quality import prompt_tokens

    ids, _ = prompt_tokens(src, 256)
    toks = mx.array([ids])
    a = np.array(load_model(src, fuse=False)(toks))[0]
    b = np.array(load_model(tmp_path / "q", fuse=False)(toks))[0]
    k = kl(a, b)
    assert abs(res.report.kl_mean - k.mean()) <= 1e-3 * k.mean()
    assert abs(res.report.kl_max - k.max()) <= 1e-3 * k.max()
    assert res.report.top1 == pytest.approx((a.argmax(-1) == b.argmax(-1)).mean())
    assert "English prompt" in res.report.prompt
    e = res.report.classes["experts"]
    assert 0.05 < e.relative < 0.15 and res.report.classes["kda_gates"].relative < 0.01  # 4-bit vs protected 8-bit
    assert "## Quality" in (tmp_path / "q" / "README.md").read_text()


def cli(*args, capsys=None):
    """Run `kimi-mlx convert ARGS` in-process; (exit code, stderr lines)."""
    from kimi_mlx.cli import main

    argv, sys.argv = sys.argv, ["kimi-mlx", "convert", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
    return code, [l for l in capsys.readouterr().err.splitlines() if l.strip()]


def _edit(src: Path, dst: Path, how: str) -> Path:
    import shutil

    shutil.copytree(src, dst)
    f, c = dst / "model.safetensors", dst / "config.json"
    if how == "no-config":
        c.unlink()
    elif how == "bad-json":
        c.write_text("{oops")
    elif how == "llama":
        c.write_text(json.dumps({**json.loads(c.read_text()), "model_type": "llama"}))
    elif how == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size - 1000])
    elif how == "garbage":
        f.write_bytes(b"\x00garbage" * 100)
    elif how == "no-tokenizer":
        (dst / "tiktoken.model").unlink()
    elif how == "bad-tokenizer":
        (dst / "tokenizer_config.json").write_text("{oops")
    else:
        w = load_file(str(f))
        if how == "missing":
            del w["model.layers.2.self_attn.q_proj.weight"]
        elif how == "shape":
            w["model.layers.3.self_attn.kv_b_proj.weight"] = np.zeros((7, 64), np.float32)
        elif how == "int":
            w["model.layers.1.self_attn.A_log"] = w["model.layers.1.self_attn.A_log"].astype(np.int32)
        save_file(w, str(f))
    return dst


@pytest.mark.parametrize("how, match", [
    ("no-config", "config.json not found"), ("bad-json", "not valid JSON"), ("llama", "not 'kimi_linear'"),
    ("truncated", "truncated or corrupt"), ("garbage", "truncated or corrupt"),
    ("missing", "missing tensor 'model.layers.2.self_attn.q_proj.weight'"),
    ("shape", "'model.layers.3.self_attn.kv_b_proj.weight' has shape \\[7, 64\\]"), ("int", "dtype I32"),
    ("no-tokenizer", "has no tiktoken.model, so the converted model would not load; copy the tokenizer files"),
    ("bad-tokenizer", "tokenizer_config.json: not valid JSON")])
def test_bad_source_is_one_line(source, tmp_path, capsys, how, match):
    bad = _edit(source[1], tmp_path / "bad", how)
    code, err = cli(bad, tmp_path / "out", "--bits", 4, capsys=capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith("error:"), err
    assert pytest.importorskip("re").search(match, err[0]), err[0]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.parametrize("args, match", [
    (["--bits", 7], "--bits 7 is not supported with mode affine"),
    (["--bits", 4, "-g", 16], "--group-size 16"), (["--mode", "mxfp4", "-g", 64], "use 32"),
    (["--mode", "nvfp4", "--bits", 8], "--bits 8"), (["--mode", "int4"], "--mode int4"),
    (["--recipe", "mixed_3_4", "--bits", 4], "sets the bits itself"),
    (["--recipe", "mixed_3_4", "--mode", "mxfp4"], "affine only"), (["--recipe", "q9"], "unknown"),
    (["-g", 64], "need --bits"), (["--bits", 4, "--override", "nope*=8"], "matches no quantizable module"),
    (["--bits", 4, "--override", "lm_head"], "PATTERN=SPEC"), (["--dtype", "int8"], "--dtype int8")])
def test_bad_flags_are_one_line(source, tmp_path, capsys, args, match):
    code, err = cli(source[1], tmp_path / "out", *args, capsys=capsys)
    assert code == 1 and len(err) == 1 and match in err[0], err
    assert not (tmp_path / "out").exists()


def test_bad_paths_are_one_line(source, tmp_path, capsys, monkeypatch):
    _, src = source
    run(src, tmp_path / "converted", 8)
    code, err = cli(tmp_path / "converted", tmp_path / "again", capsys=capsys)
    assert code == 1 and len(err) == 1 and "already converted" in err[0], err
    cases = [((tmp_path / "nope", tmp_path / "o"), "no such directory"),
             (("someone/no-such-repo", tmp_path / "o"), "hub download failed"),
             ((src, src / "inside"), "overlap"), ((src, tmp_path / "docs"), "not a checkpoint directory")]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("precious")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for (s, o), match in cases:
        code, err = cli(s, o, "--force", capsys=capsys)
        assert code == 1 and len(err) == 1 and match in err[0], err
    monkeypatch.setattr(output.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    code, err = cli(src, tmp_path / "o", capsys=capsys)
    assert code == 1 and "not enough free disk space" in err[0] and not (tmp_path / "o").exists()


def test_force_semantics(source, tmp_path, capsys, monkeypatch):
    _, src = source
    out = tmp_path / "out"
    assert cli(src, out, "--bits", 8, "--no-report", capsys=capsys)[0] == 0
    (out / "marker").write_text("old")
    code, err = cli(src, out, capsys=capsys)
    assert code == 1 and "already exists" in err[0] and (out / "marker").exists()

    def fail(self, arrays):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(output.ShardWriter, "add", fail)  # a failed --force run keeps the old OUT
    code, err = cli(src, out, "--force", capsys=capsys)
    assert code == 1 and "disk on fire" in err[-1] and (out / "marker").exists()
    assert [l for l in err if "error" in l] == err[-1:]  # progress lines, then one error line
    monkeypatch.undo()
    assert cli(src, out, "--force", "--dtype", "float32", capsys=capsys)[0] == 0
    assert not (out / "marker").exists() and "quantization" not in json.loads((out / "config.json").read_text())
    assert load_model(out) is not None and not list(tmp_path.glob(".out.*"))


PAUSE = """
import sys, time
from kimi_mlx.weights import output
add = output.ShardWriter.add
def slow(self, arrays):
    add(self, arrays)
    if len(self.parts) == 2:
        print("PAUSED", flush=True)
        time.sleep(60)
output.ShardWriter.add = slow
sys.argv = ["kimi-mlx", "convert", *sys.argv[1:]]
from kimi_mlx.cli import main
main()
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["int", "term", "kill"])
def test_interrupted_conversion_leaves_nothing_that_loads(source, tmp_path, sig):
    _, src = source
    out = tmp_path / "out"
    with subprocess.Popen([sys.executable, "-c", PAUSE, str(src), str(out), "--bits", "4"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
        assert p.stdout.readline().strip() == "PAUSED"
        partial = list(tmp_path.glob(".out.partial-*"))
        assert len(partial) == 1 and list(partial[0].glob("*.safetensors"))  # mid-way: shards written
        p.send_signal(sig)
        stderr = p.communicate(timeout=30)[1]
    assert p.returncode != 0 and not out.exists()
    if sig != signal.SIGKILL:
        err = [l for l in stderr.splitlines() if l.startswith("error:")]
        assert err == [f"error: interrupted; {out} was not written"]
        assert not list(tmp_path.glob(".out.partial-*"))
        return
    with pytest.raises(KimiError):  # a killed run's leftovers do not load ...
        load_model(partial[0])
    run(src, out, 4)  # ... and the next run removes them
    assert not partial[0].exists() and out.is_dir()


def test_shards_are_split_at_the_limit(source, tmp_path):
    _, src = source
    res = run(src, tmp_path / "s", dtype="float32", max_shard_bytes=100_000)
    files = list((tmp_path / "s").glob("model-*.safetensors"))
    assert res.shards == len(files) > 6
    for f in files:
        w = mx.load(str(f))
        assert len(w) == 1 or sum(a.nbytes for a in w.values()) <= 100_000
    assert np.array_equal(logits(load_model(tmp_path / "s")), logits(load_model(src)))


def test_root_convert_script(source, tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "convert.py"), str(source[1]), str(tmp_path / "o"), "--bits", "8"],
                       capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    assert "KL mean" in r.stderr and (tmp_path / "o" / "config.json").exists()


def test_sampled_weight_error_matches_exact():
    from kimi_mlx.weights.quality import SAMPLE, weight_error

    # an expert bank whose experts differ in scale: the sample must cover them all
    w = mx.random.normal((4, 1024, 4096), key=mx.random.key(0)) * mx.linspace(0.1, 2, 4)[:, None, None]
    q = nn.Linear(w.shape[-1], 1).to_quantized(group_size=64, bits=4)
    q.weight, q.scales, q.biases = mx.quantize(w, 64, 4)
    e, n = weight_error(w, q)
    d = mx.dequantize(q.weight, q.scales, q.biases, 64, 4) - w
    assert w.size > 2 * SAMPLE and e / n == pytest.approx(float(mx.sum(d * d) / mx.sum(w * w)), rel=0.02)
