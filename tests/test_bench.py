"""The benchmark harness runs end to end (speed itself is measured in benchmarks/, not here)."""

import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from kimi_mlx import bench


def test_identical_weights_give_matching_logits():
    """The random model is built once and fed through both projects' loaders: same weights, same math."""
    ours, theirs, _ = bench.build("small", bits=0, dtype=mx.float32, peer=True)
    toks = mx.array(np.random.default_rng(0).integers(0, 4096, (1, 24)))
    a = ours(toks)
    b = theirs(toks)
    assert float(mx.abs(a - b).max()) <= 1e-3 * float(mx.abs(b).max())


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_filled_context_rows_take_the_models_activation_dtype(dtype):
    """fill_context writes the rows a prefill would: in the activations' dtype, for both runners (float32 rows
    under a bfloat16 model, or the reverse, would make each decode step convert the cache)."""
    ours, theirs, _ = bench.build("small", bits=4, dtype=dtype, peer=True)
    cfg = ours.config
    mine, peer = bench.Runner("kimi-mlx", ours, True), bench.Runner("mlx-lm", theirs, False)
    for r in (mine, peer):
        r.fill_context(40, cfg)
    pages = [p for s in mine.state.layers if hasattr(s, "pages") for page in s.pages for p in page]
    kv = [x for c in peer.state if hasattr(c, "keys") and c.keys is not None for x in (c.keys, c.values)]
    assert pages and kv and {a.dtype for a in pages + kv} == {dtype}
    assert mine.state.offset == 40 and all(c.offset == 40 for c in peer.state if hasattr(c, "keys") and c.keys is not None)


def test_bytes_read_a_token_count_what_decode_reads(demo_random):
    """Where model/fuse.py derived a matrix decode reads instead (q_kv for q_proj | kv_a_proj_with_mqa; gates_out
    for f_b_proj | g_b_proj; q_absorb, v_absorb for k_up, v_up), only the derived one counts."""
    model, _ = demo_random
    attns = [l.self_attn for l in model.model.layers]
    fused = bench.active_bytes_per_token(model)
    mla = [a for a in attns if "q_kv" in a]
    kept = [(a, a.q_kv) for a in mla]
    for a in mla:
        del a["q_kv"]  # the same rows as q_proj and kv_a_proj_with_mqa: the same bytes either way
    try:
        assert bench.active_bytes_per_token(model) == fused
    finally:
        for a, m in kept:
            a.q_kv = m
    kda = [a for a in attns if "gates_out" in a]
    out_bytes = sum(sum(v.nbytes for _, v in tree_flatten(a.gates_out.parameters())) for a in kda)
    parts_bytes = sum(sum(v.nbytes for _, v in tree_flatten(m.parameters())) for a in kda for m in (a.f_b_proj, a.g_b_proj))
    assert mla and kda and out_bytes == 2 * parts_bytes  # zero blocks beside f_b and g_b
    kept = [(a, a.gates_out) for a in kda]
    for a in kda:
        del a["gates_out"]
    try:
        assert bench.active_bytes_per_token(model) == fused - out_bytes + parts_bytes
    finally:
        for a, m in kept:
            a.gates_out = m


def test_run_prints_ratios_and_memory():
    lines = []
    rows = bench.run("small", contexts=(64,), prefill=(64,), decode_tokens=4, step=64, bits=4, echo=lines.append)
    text = "\n".join(lines)
    assert "ratio" in text and "peak" in text and "read per decoded token" in text
    assert {(r["what"], r["runner"]) for r in rows} == {(w, n) for w in ("prefill", "decode") for n in ("kimi-mlx", "mlx-lm")}
    assert all(r["tok_s"] > 0 for r in rows)


def test_batch_decode_runs_both_engines_at_each_batch_size():
    """--batch: ours (the batch engine's step) and mlx-lm's BatchGenerator at each size, aggregate tok/s and
    per-sequence latency, on the CPU at the smallest sizes."""
    lines = []
    rows = bench.run("small", contexts=(32,), prefill=(), decode_tokens=2, bits=4, echo=lines.append, batches=(1, 2))
    batched = [r for r in rows if r["what"] == "batch_decode"]
    assert {(r["batch"], r["runner"]) for r in batched} == {(b, n) for b in (1, 2) for n in ("kimi-mlx", "mlx-lm")}
    assert all(r["tok_s"] > 0 and r["ms_per_token"] > 0 for r in batched)
    assert any("batch   2" in line and "ms a token a sequence" in line and "ratio" in line for line in lines)


def test_cli_bench_batch_sizes_are_checked():
    from kimi_mlx.cli import _batches
    from kimi_mlx.errors import KimiError

    assert _batches("1,2, 8") == (1, 2, 8) and _batches("") == ()
    with pytest.raises(KimiError, match="--batch 0,2"):
        _batches("0,2")


def test_decode_rounds_alternate_the_runners_and_report_medians(monkeypatch):
    """rounds > 1: each runner decodes every context that many times, the runners alternating (and their order
    too), and the line gives each runner's median and the median of the rounds' ratios with their range."""
    order = []
    speeds = {"kimi-mlx": iter([30.0, 10.0, 20.0]), "mlx-lm": iter([10.0, 10.0, 10.0])}

    def fake_decode(r, n):
        order.append(r.name)
        return next(speeds[r.name])

    monkeypatch.setattr(bench, "time_decode", fake_decode)
    lines = []
    rows = bench.run("small", contexts=(64,), prefill=(), decode_tokens=4, bits=4, echo=lines.append, rounds=3)
    assert order == ["kimi-mlx", "mlx-lm", "mlx-lm", "kimi-mlx", "kimi-mlx", "mlx-lm"]
    assert {r["runner"]: r["tok_s"] for r in rows} == {"kimi-mlx": 20.0, "mlx-lm": 10.0}
    assert [r["rounds"] for r in rows if r["runner"] == "kimi-mlx"] == [[30.0, 10.0, 20.0]]
    assert "ratio 2.00x (median of 3 rounds, 1.00-3.00)" in lines[-1]


def test_a_negative_prefill_step_is_a_one_line_error_before_any_output(tmp_path):
    """kimi-mlx bench --step, benchmarks/e2e.py --step and long_prefill.py --step: a negative step is refused in
    one line (0 is the automatic plan), before anything is measured or saved."""
    from pathlib import Path

    here = Path(__file__).resolve().parent.parent / "benchmarks"
    runs = {"error: a prefill step of -1 tokens": [sys.executable, "-m", "kimi_mlx", "bench", "--shape", "small",
                                                    "--no-peer", "--step", "-1"],
            "e2e.py: error: --step": [sys.executable, str(here / "e2e.py"), "--step", "-1"],
            "long_prefill.py: error: --step": [sys.executable, str(here / "long_prefill.py"), "--step", "-1",
                                               "--state", str(tmp_path / "s.kimi")]}
    for says, args in runs.items():
        r = subprocess.run(args, capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert says in r.stderr + r.stdout and "prefill " not in r.stdout, (r.stdout, r.stderr)
    assert not (tmp_path / "s.kimi").exists()


def test_cli_bench_on_a_checkpoint():
    r = subprocess.run([sys.executable, "-m", "kimi_mlx", "bench", "--model", "demo", "--contexts", "32",
                        "--prefill", "32", "--decode-tokens", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "decode @" in r.stdout and "prefill" in r.stdout


def test_step_at_reports_memory_and_estimates_whole_prefill():
    lines = []
    rows = bench.run("small", contexts=(), prefill=(), step=32, bits=4, peer=True, step_at=(64, 128),
                     peer_prefill_max=64, echo=lines.append)
    text = "\n".join(lines)
    assert [(r["tokens"], r["runner"]) for r in rows if r["what"] == "prefill_step"] == [
        (64, "kimi-mlx"), (64, "mlx-lm"), (128, "kimi-mlx")]
    step_lines = [l for l in lines if l.startswith("prefill step at")]
    assert "ratio" in step_lines[0] and "mlx-lm not run" in step_lines[1]
    assert text.count("estimated from the steps above") == 2


def test_prefill_estimate_integrates_an_affine_step_time():
    # step time 1 + S/100 s at context S (end of the step): steps of 100 end at 100, 200, 300
    assert abs(bench.prefill_estimate({100: 2.0, 300: 4.0}, 300, 100) - (2 + 3 + 4)) < 1e-9
    assert abs(bench.prefill_estimate({100: 2.0}, 250, 100) - 6.0) < 1e-9


def test_resumable_prefill_equals_one_go(tmp_path):
    """A prompt fed over several runs (the state saved and loaded between them) ends in the same state as
    one run; a state saved with other weights is refused in one line."""
    import numpy as np

    from kimi_mlx.errors import KimiError

    model, _, cfg = bench.build("small", bits=0, dtype=mx.float32, peer=False)
    toks = np.random.default_rng(0).integers(0, cfg["vocab_size"], (1, 300))
    one, prog = bench.resumable_prefill(model, toks, tmp_path / "one.kimi", 64, 1e9, echo=lambda s: None)
    assert prog.done == 300
    runs = 0
    while True:
        state, prog = bench.resumable_prefill(model, toks, tmp_path / "parts.kimi", 64, 0.0, echo=lambda s: None)
        runs += 1
        if prog.done == 300:
            break
    assert runs == 5 and state.offset == 300
    assert prog.step_gb > 0 and 64 <= prog.step_at <= 300  # the largest step's working set, kept across runs
    assert prog.peak_gb >= prog.step_gb
    x = mx.array([[5]])
    a, b = model(x, state), model(x, one)  # the cache pages split differently: float-order noise only
    assert float(mx.abs(a - b).max()) <= 1e-5 * float(mx.abs(b).max())
    other, _, _ = bench.build("small", bits=0, dtype=mx.float32, peer=False, seed=1)
    with pytest.raises(KimiError, match="different model"):
        bench.resumable_prefill(other, toks, tmp_path / "parts.kimi", 64, 0.0)


def test_long_prefill_script_resumes_and_decodes(tmp_path):
    """benchmarks/long_prefill.py: a first run (after its untimed warm-up step) stops at its budget and saves, a
    second one finishes, reports the peak against weights + cache and decodes at the full context and at a short
    one; --each prints every step."""
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "long_prefill.py"
    args = [sys.executable, str(script), "--shape", "small", "--tokens", "192", "--step", "64",
            "--state", str(tmp_path / "s.kimi"), "--decode-tokens", "2", "--each"]
    first = subprocess.run(args + ["--budget-s", "0"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "warm-up step of 64 tokens into a scratch state" in first.stdout
    assert "step ending at 64: " in first.stdout and "saved at 64 / 192 tokens" in first.stdout
    runs = 1
    while "decode from" not in (out := subprocess.run(args + ["--budget-s", "0"], capture_output=True, text=True,
                                                       timeout=300)).stdout:
        assert out.returncode == 0 and "saved at" in out.stdout, out.stderr
        runs += 1
    assert runs == 2 and out.returncode == 0, out.stderr
    assert "prefill of 192 tokens" in out.stdout and "= weights" in out.stdout
    assert "+ state " in out.stdout and "(MLA cache " in out.stdout
    assert "largest working set of one step" in out.stdout and "(the step ending at " in out.stdout
    assert "decode from 192 to 198 tokens of context" in out.stdout
    assert "decode from 1024 tokens of context" in out.stdout and "at 192 tokens" in out.stdout


def test_state_parts_splits_the_state_into_the_mla_cache_as_allocated_and_the_kda_state():
    """long_prefill's memory bound counts the whole state: the MLA pages as allocated (256 rows for 192 tokens)
    and every KDA layer's recurrent state and conv tail."""
    import numpy as np

    model, _, cfg = bench.build("small", bits=0, dtype=mx.float32, peer=False)
    state = model.new_state(1)
    bench.prefill_step(model, state, mx.array(np.arange(192).reshape(1, 192)))
    cache, kda = bench.state_parts(state)
    lin = cfg["linear_attn_config"]
    mla_layers, kda_layers = len(lin["full_attn_layers"]), len(lin["kda_layers"])
    width = cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
    item = next(s for s in state.layers if hasattr(s, "pages")).pages[0][0].itemsize
    assert cache == mla_layers * 256 * width * item
    heads, d = lin["num_heads"], lin["head_dim"]
    recurrent = kda_layers * heads * d * d * 4
    tails = kda_layers * (lin["short_conv_kernel_size"] - 1) * 3 * heads * d
    assert kda in (recurrent + tails * 4, recurrent + tails * 2)  # conv tails in float32 or bfloat16
    assert cache + kda == bench.state_bytes(state)


def test_resumable_prefill_traces_the_layers_of_a_large_step(tmp_path, monkeypatch):
    """trace_gb: paced steps run layer by layer and a step past the threshold names the layers that held the
    most; the state ends as without tracing."""
    import numpy as np

    from kimi_mlx.model import decoder

    monkeypatch.setattr(decoder, "PACED_ON", (mx.cpu,))
    monkeypatch.setattr(decoder, "PACED_PREFILL", 32)
    model, _, cfg = bench.build("small", bits=0, dtype=mx.float32, peer=False)
    toks = np.random.default_rng(0).integers(0, cfg["vocab_size"], (1, 128))
    lines = []
    traced, prog = bench.resumable_prefill(model, toks, tmp_path / "t.kimi", 64, 1e9, echo=lines.append, trace_gb=0.0)
    plain, _ = bench.resumable_prefill(model, toks, tmp_path / "p.kimi", 64, 1e9, echo=lambda s: None)
    traces = [s for s in lines if "most held during layers" in s]
    assert len(traces) == 2 and all("(KDA)" in s or "(MLA)" in s for s in traces), lines
    assert model.layer_done is None and prog.step_gb > 0
    x = mx.array([[5]])
    assert float(mx.abs(model(x, traced) - model(x, plain)).max()) == 0.0


def test_resumable_prefill_reports_memory_kept_between_steps(tmp_path, monkeypatch):
    """Memory that stays in use between steps beyond the weights and the state is reported as it grows."""
    import numpy as np

    model, _, cfg = bench.build("small", bits=0, dtype=mx.float32, peer=False)
    toks = np.random.default_rng(0).integers(0, cfg["vocab_size"], (1, 256))
    monkeypatch.setattr(bench, "KEPT_REPORT_GB", 0.001)
    lines, leak, step = [], [], bench.prefill_step

    def leaky(model, state, x):  # keeps 4 MB a step alive, as a leak would
        leak.append(mx.ones((1 << 20,)) + 0)
        mx.eval(leak[-1])
        return step(model, state, x)

    monkeypatch.setattr(bench, "prefill_step", leaky)
    bench.resumable_prefill(model, toks, tmp_path / "k.kimi", 64, 1e9, echo=lines.append)
    def later(lines):  # reports after the first step (which leaves a few MB of compiled graphs and cached indices)
        return [s for s in lines if "beyond the weights and the state" in s and "from 64:" not in s]

    assert len(later(lines)) >= 2, lines  # 8 MB by the third step, 12 by the fourth
    monkeypatch.setattr(bench, "prefill_step", step)
    leak.clear()
    lines.clear()
    bench.resumable_prefill(model, toks, tmp_path / "n.kimi", 64, 1e9, echo=lines.append)
    assert not later(lines), lines


def test_step_memory_script_runs_each_setting():
    """benchmarks/step_memory.py: one line per run, its settings named, a working set for each step; the
    shipped settings are restored (the module constants it sets)."""
    from pathlib import Path

    from kimi_mlx.ops import attention

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "step_memory.py"
    out = subprocess.run([sys.executable, str(script), "--shape", "small", "--context", "384", "--steps", "2",
                          "--step", "64", "--runs", "default,8,off"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [s for s in out.stdout.splitlines() if s.startswith("tiles wait")]
    shipped = "off" if attention.FREE_SLACK is None else str(attention.FREE_SLACK >> 20)
    assert [s.split("MB")[1].split(": ")[0].strip() for s in lines] == [shipped, "8", "off"]
    assert all(len(s.split(": ")[-1].split()) == 2 for s in lines), lines
    for runs, message in (("8:1", "neither 'default', a whole number of MB nor 'off'"),
                          ("x", "neither 'default', a whole number of MB nor 'off'")):
        bad = subprocess.run([sys.executable, str(script), "--runs", runs], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr and message in bad.stderr, bad.stderr


def test_prefill_keeps_no_activation_buffers_between_steps():
    """After a prefill step only the weights and the state stay in use: the KDA conv tail is its own array,
    not a slice keeping the step's whole [T + K - 1, 3 * H * D] conv input alive (50 MB a layer at the real
    shape for a 2,048-token step, 1 GB over its 20 KDA layers)."""
    import numpy as np

    model, _, cfg = bench.build("small", bits=0, dtype=mx.float32, peer=False)
    state = model.new_state(1)
    state.eval()
    mx.synchronize()
    base = mx.get_active_memory() - bench.state_bytes(state)
    T = 512
    bench.prefill_step(model, state, mx.array(np.random.default_rng(0).integers(0, cfg["vocab_size"], (1, T))))
    mx.synchronize()
    kda = [layer.self_attn for layer in model.model.layers if layer.is_kda]
    conv_input = len(kda) * (T + 3) * kda[0].conv_weight.shape[1] * 4  # what slices of it would keep
    kept = mx.get_active_memory() - base - bench.state_bytes(state)
    assert kept < conv_input / 20, (kept, conv_input)


def test_device_line_names_mlx_batch_limits_when_set(monkeypatch):
    for k in bench.MLX_BATCH_ENV:
        monkeypatch.delenv(k, raising=False)
    assert "MLX_MAX" not in bench.device_line()
    monkeypatch.setenv("MLX_MAX_MB_PER_BUFFER", "200")
    on_gpu = mx.default_device() == mx.gpu
    assert bench.device_line().endswith("(MLX_MAX_MB_PER_BUFFER=200)") == on_gpu  # the CPU reads neither limit
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    assert bench.device_line().endswith("(MLX_MAX_MB_PER_BUFFER=200)")


def test_layer_profile_script_times_every_sublayer_against_the_peer():
    """benchmarks/layer_profile.py: one line per attention and FFN half of every layer, ours and mlx-lm's with
    their ratio, and the total."""
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "layer_profile.py"
    out = subprocess.run([sys.executable, str(script), "--shape", "small", "--tokens", "64", "--bits", "0",
                          "--reps", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [s for s in out.stdout.splitlines() if s.startswith("layer")]
    assert len(lines) == 2 * 4 and all(s.endswith("x") and len(s.split()) == 7 for s in lines), lines
    assert out.stdout.splitlines()[-1].startswith("all layers")


def test_decode_kernels_script_splits_a_token_and_sums_an_ncu_log(tmp_path):
    """benchmarks/decode_kernels.py: build / queue / wait a token, each round's rate their inverse sum (with
    --nap, each round again with the host asleep that long a token, counted in the wait); --parse sums an ncu CSV
    log's kernel times per token (units mixed) and ranks the kernels."""
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "decode_kernels.py"
    out = subprocess.run([sys.executable, str(script), "--shape", "small", "--context", "64", "--tokens", "4",
                          "--nap", "6"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [s.split() for s in out.stdout.splitlines()[2:]]
    assert len(rows) == 6 and all(len(r) == 5 for r in rows), out.stdout
    for i, (rate, *ms, nap) in enumerate([float(x) for x in r] for r in rows):
        assert abs(rate - 1e3 / sum(ms)) <= 0.06 * rate + 0.1
        assert nap == (6.0 if i % 2 else 0.0) and (ms[2] >= 6.0 if i % 2 else ms[2] < 6.0), out.stdout
    head = ['"ID"', '"Process ID"', '"Process Name"', '"Host Name"', '"Kernel Name"', '"Context"', '"Stream"',
            '"Block Size"', '"Grid Size"', '"Device"', '"CC"', '"Section Name"', '"Metric Name"', '"Metric Unit"',
            '"Metric Value"']
    def row(i, name, unit, value, grid="(1, 1, 1)", metric="gpu__time_duration.sum"):
        return [f'"{i}"', '"1"', '"python3"', '"h"', f'"{name}"', '"1"', '"7"', '"(32, 1, 1)"', f'"{grid}"', '"0"',
                '"9.0"', '"Command line profiler metrics"', f'"{metric}"', f'"{unit}"', f'"{value}"']
    log = [head, row(0, "void mlx::qmv_kernel<bf16, 4>(const T *)", "usecond", "10.5"),
           row(0, "void mlx::qmv_kernel<bf16, 4>(const T *)", "", "1", metric="launch__grid_size"),  # ignored
           row(1, "void mlx::qmv_kernel<bf16, 4>(const T *)", "nsecond", "9,500"),
           row(2, "mlx::custom_kernel_kda_decode_32", "msecond", "0.002")]
    (tmp_path / "k.csv").write_text("==PROF== Connected\n" + "\n".join(",".join(r) for r in log) + "\n")
    out = subprocess.run([sys.executable, str(script), "--parse", str(tmp_path / "k.csv"), "--tokens", "2"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "2 kernels a token, 0.011 ms of kernel time a token (serialized by ncu)", lines
    assert lines[1].split() == ["0.010", "ms", "1.0x", "void", "mlx::qmv_kernel"], lines
    assert lines[2].split() == ["0.001", "ms", "0.5x", "mlx::custom_kernel_kda_decode_32"], lines
    log[3] = row(1, "void mlx::qmv_kernel<bf16, 4>(const T *)", "nsecond", "9,500", grid="(288, 1, 1)")
    (tmp_path / "g.csv").write_text("\n".join(",".join(r) for r in log) + "\n")
    out = subprocess.run([sys.executable, str(script), "--parse", str(tmp_path / "g.csv"), "--tokens", "1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    kernels = out.stdout.splitlines()[1:]
    assert len(kernels) == 3 and kernels[0].endswith("mlx::qmv_kernel grid (1, 1, 1)"), out.stdout
    assert kernels[1].split()[:2] == ["0.009", "ms"] and kernels[1].endswith("mlx::qmv_kernel grid (288, 1, 1)")
    seams = [head, row(0, "void mlx::rms_norm_small<bf16>(const T *)", "usecond", "2"),
             row(1, "void mlx::qmm_sm80_kernel<64>(const T *)", "usecond", "30"),
             row(2, "void mlx::gather<float>(const T *)", "usecond", "5"),
             row(3, "mlx::custom_kernel_add_norm_2304_8", "usecond", "4"),
             row(4, "void cutlass::Kernel2<x>(const T *)", "usecond", "7")]
    (tmp_path / "s.csv").write_text("\n".join(",".join(r) for r in seams) + "\n")
    out = subprocess.run([sys.executable, str(script), "--parse", str(tmp_path / "s.csv"), "--tokens", "1",
                          "--by-seam"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    table = [line.split() for line in out.stdout.splitlines()[-2:]]
    assert table == [["0", "3", "0.037", "0.030", "0.000", "0.005", "0.000", "0.002"],
                     ["1", "2", "0.011", "0.000", "0.007", "0.000", "0.004", "0.000"]], out.stdout
    (tmp_path / "bad.csv").write_text("a,b\n")
    for args in (["--parse", str(tmp_path / "none.csv")], ["--parse", str(tmp_path / "bad.csv")], ["--tokens", "0"],
                 ["--shape", "huge"], ["--steps", "0"], ["--by-seam"], ["--context", "0"], ["--prefill", "-1", "--profile", "1"],
                 ["--nap", "x"], ["--nap", "-1"],
                 *([["--profile", "1"]] if not mx.cuda.is_available() else [])):
        bad = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.strip().splitlines()[-1].startswith(
            "decode_kernels.py: error:"), bad.stderr


def test_decode_kernels_script_splits_prefill_steps():
    """decode_kernels.py --prefill N (no --profile): each window's step time is its building, queueing and waiting
    summed, and its rate the step's tokens over that."""
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "decode_kernels.py"
    out = subprocess.run([sys.executable, str(script), "--shape", "small", "--context", "0", "--prefill", "64",
                          "--steps", "2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [[float(x) for x in s.split()] for s in out.stdout.splitlines()[3:]]
    assert len(rows) == 3 and all(len(r) == 5 for r in rows), out.stdout
    for rate, step, *parts in rows:
        assert abs(step - sum(parts)) <= 0.02 * step + 0.2 and abs(rate - 64e3 / step) <= 0.02 * rate + 1


@pytest.mark.skipif(sys.platform == "darwin", reason="Metal keeps MLX's per-chip command-buffer sizes")
@pytest.mark.parametrize("given", [None, "7"])
@pytest.mark.parametrize("name", ["MLX_MAX_OPS_PER_BUFFER", "MLX_MAX_MB_PER_BUFFER"])
def test_importing_sets_the_cuda_graph_limits_unless_the_user_did(name, given):
    """kimi_mlx sets MLX's CUDA graph limits (20 ops, no practical MB limit) before MLX reads them (at the
    device's first use), not over a value the user set."""
    import os

    import kimi_mlx

    env = {k: v for k, v in os.environ.items() if k != name}
    if given:
        env[name] = given
    code = f"import os, kimi_mlx; print(os.environ['{name}'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == (given or kimi_mlx.CUDA_GRAPH_LIMITS[name])
    assert int(kimi_mlx.CUDA_GRAPH_LIMITS["MLX_MAX_MB_PER_BUFFER"]) >= 100000  # a 1M-token decode stays one cut


def test_recorder_labels_a_section_with_the_commit_given_before_git(tmp_path, monkeypatch):
    """The GPU machine's copy of the tree may carry a stale .git: KIMI_MLX_COMMIT, where set, names the commit."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import results

    out = tmp_path / "RESULTS.md"
    monkeypatch.setattr(results, "RESULTS", out)
    monkeypatch.setenv("KIMI_MLX_COMMIT", "abc1234")
    rec = results.Recorder()
    rec("a line")
    rec.append("probe")
    monkeypatch.delenv("KIMI_MLX_COMMIT")
    rec.append("probe")
    here = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent).stdout.strip()
    titles = [line for line in out.read_text().splitlines() if line.startswith("### ")]
    assert titles[0].endswith("commit abc1234") and titles[1].endswith(f"commit {here or '?'}")


def test_decode_kernels_script_times_a_batched_step():
    """benchmarks/decode_kernels.py --batch B: each round times a decode step of B sequences together (the batch
    engine's step); its rate is B over the step's summed phases."""
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "decode_kernels.py"
    out = subprocess.run([sys.executable, str(script), "--shape", "small", "--context", "64", "--tokens", "3",
                          "--batch", "3"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "3 sequences a step" in out.stdout.splitlines()[0], out.stdout
    rows = [[float(x) for x in s.split()] for s in out.stdout.splitlines()[2:]]
    assert len(rows) == 3 and all(len(r) == 4 for r in rows), out.stdout
    for rate, *ms in rows:
        assert abs(rate - 3e3 / sum(ms)) <= 0.06 * rate + 0.1, out.stdout
    bad = subprocess.run([sys.executable, str(script), "--batch", "2", "--nap", "1"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "--batch" in bad.stderr


def test_decode_kernels_script_alternates_expert_paths():
    """decode_kernels.py --experts A,B: each of three rounds times A then B in the same process (on the CPU both
    take the gather matmuls); a value that is no expert path, or --experts with --nap, is one line."""
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "decode_kernels.py"
    out = subprocess.run([sys.executable, str(script), "--shape", "small", "--context", "64", "--tokens", "2",
                          "--batch", "2", "--experts", "auto,gather"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [s.split() for s in out.stdout.splitlines()[2:]]
    assert [r[-1] for r in rows] == ["auto", "gather"] * 3 and all(len(r) == 5 for r in rows), out.stdout
    for args in (["--experts", "fast"], ["--experts", "auto", "--nap", "1"]):
        bad = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "--experts" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_experts_decode_script_refuses_bad_arguments_in_one_line():
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "experts_decode.py"
    for args in (["--tokens", "x"], ["--tokens", "0"], ["--pool", "4"], ["--wide-units", "x"], ["--wide-units", "1/64"],
                 *([["--paths", "wide"]] if mx.default_device() == mx.cpu else [])):
        bad = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.strip().splitlines()[-1].startswith(
            "experts_decode.py: error:"), (args, bad.stderr)
