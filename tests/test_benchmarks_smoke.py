"""Every script in benchmarks/ runs on the CPU at its smallest size and prints its result line, so none can
rot unnoticed (a changed call signature fails here, not on the GPU machine a month later). The numbers are
not checked: on a CPU at these sizes they measure nothing."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
BENCH = REPO / "benchmarks"

# (script, arguments, a line of its result that must be printed); {tmp} is a fresh directory, {hf} a tiny HF
# checkpoint with the packaged demo's tokenizer
RUNS = [
    ("chart.py", ["--contexts", "1k,32k", "--ours", "300,250", "--peer", "80,70", "--title", "t", "--out",
                  "{tmp}/c.svg"], r"^wrote .*c\.svg$"),
    ("convert_memory.py", ["--tiny", "--experts", "8", "--layers", "km"],
     r"^4-bit kimi recipe \+ quality report +[\d.]+GB"),
    ("distributed.py", ["--prompt", "16", "--decode", "2", "--repeats", "1", "--runs", "1,2"],
     r"^ +2 \| 0-3 4-7 +\| +[\d.]+ \| +[\d.]+ \|"),
    ("e2e.py", ["--shape", "small", "--contexts", "64", "--prefill", "32", "--decode-tokens", "2"],
     r"^decode @ +64: kimi-mlx +[\d.]+ tok/s .*\| mlx-lm +[\d.]+ tok/s"),
    ("experts_decode.py", ["--tokens", "2", "--scale", "16", "--calls", "1", "--routings", "2"], r"^\| 2 \| [\d.]+ \(\d+\) \|$"),
    ("expert_reads.py", ["--experts", "4", "--reads", "2", "--rounds", "1", "--dir", "{tmp}"], r"^cold: +1 run \(per expert\): +[\d.]+ ms an expert"),
    ("kda.py", ["--lengths", "1,16", "--repeats", "1", "--steps", "2"], r"^ +1 \| +\d+/\d+ us \|"),
    ("long_context.py", ["--lengths", "64", "--step", "32", "--fused-max", "64", "--prefill-contexts", "64",
                         "--decode-contexts", "64", "--layer-step", "16", "--quant-tokens", "32"],
     r"^\| 4-bit \| 120 \(f32 run\) \|"),
    ("offload.py", ["--dir", "{tmp}/ck", "--shape", "small", "--budgets", "0.004,resident", "--tokens", "2",
                    "--warmup", "1", "--prefetch", "off,on", "--prefill", "24"],
     r"^0\.004 GB \| pool \d+/16 a layer .* hit rate [\d.]+ \| .* prefetch on"),
    ("perplexity.py", ["--hf", "{hf}", "--variants", "3", "--doc-tokens", "64", "--code-tokens", "1",
                       "--chat-tokens", "1", "--long-files", "1", "--long-tokens", "64", "--chains", "1",
                       "--reply-tokens", "4"],
     r"^\| fresh state, same tokens \| [\d.]+ \|"),
    ("probe_prefill.py", ["--parts", "moe,kda,tile,mla,decode,ops", "--shape", "small", "--tokens", "16",
                          "--mla-contexts", "32", "--tiles-mb", "1", "--decode-contexts", "32", "--scan-rows", "1",
                          "--reps", "1"],
     r"^MLA layer decode, context 32, compiled whole pages +[\d.]+ ms"),
    # (--batch 2: the batched tasks and, after the one-sequence table, the batched verification's row)
    ("speculative.py", ["--max-tokens", "8", "--rounds", "1", "--shape", "small", "--context", "64", "--ks", "2", "--reps", "1",
                        "--batch", "2"],
     r"^\| 2 \| [\d.]+ \| [\d.]+ \|$"),
    ("speculative.py", ["--max-tokens", "8", "--rounds", "1", "--shape", "none", "--beside", "--dtype", "float32"],
     r"^\| ngram \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$"),
    ("qmm_rows.py", ["--rows", "2", "--scale", "32", "--calls", "1"], r"^\| lm_head \| \d+ \| \d+ \| [\d.]+ \| [\d.]+ / [\d.]+ / [\d.]+ \|$"),
    ("server.py", ["--turns", "2", "--user-tokens", "16", "--max-tokens", "2", "--api", "both"],
     r"^sum of TTFT: [\d.]+ s with the prefix cache, [\d.]+ s without"),
    ("server.py", ["--api", "batch", "--requests", "3", "--batch-prompt-tokens", "16", "--batch-tokens", "3",
                   "--repeats", "1"],
     r"^3 concurrent requests: [\d.]+ s \([\d.]+ tok/s\) \| one by one: [\d.]+ s .*: [\d.]+x$"),
]
NOT_RUN = {"results.py": "a module the scripts import (Recorder), not a benchmark"}
# scripts whose output tests/test_bench.py already checks line by line, run there at these sizes
RUN_IN_TEST_BENCH = {
    "decode_kernels.py": ["test_decode_kernels_script_splits_a_token_and_sums_an_ncu_log",
                          "test_decode_kernels_script_splits_prefill_steps"],
    "layer_profile.py": ["test_layer_profile_script_times_every_sublayer_against_the_peer"],
    "long_prefill.py": ["test_long_prefill_script_resumes_and_decodes"],
    "step_memory.py": ["test_step_memory_script_runs_each_setting"],
}


def test_every_script_is_run():
    import ast

    scripts = {p.name for p in BENCH.glob("*.py")}
    assert scripts == {s for s, _, _ in RUNS} | set(NOT_RUN) | set(RUN_IN_TEST_BENCH)
    source = (REPO / "tests" / "test_bench.py").read_text()
    tests = {f.name: ast.get_source_segment(source, f) for f in ast.parse(source).body
             if isinstance(f, ast.FunctionDef)}
    for script, names in RUN_IN_TEST_BENCH.items():
        for name in names:
            assert f'"{script}"' in tests.get(name, ""), f"tests/test_bench.py::{name} does not run {script}"


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny random HF checkpoint (transformers' own layout) speaking the packaged demo's tokenizer."""
    import hf_oracle
    from convert_helpers import SHAPE

    from kimi_mlx.demo import PACKAGED

    out = tmp_path_factory.mktemp("hf")
    model = hf_oracle.make_model(hf_oracle.make_config("km", kda_heads=2, kda_dim=64,
                                                       **{**SHAPE, "vocab_size": 4352}))
    hf_oracle.save(model, out)
    for name in ("tiktoken.model", "tokenizer_config.json"):
        shutil.copy(PACKAGED / name, out / name)
    return out


@pytest.mark.parametrize("script, args, result", RUNS, ids=[s for s, _, _ in RUNS])
def test_script_runs_on_the_cpu(script, args, result, tmp_path, request):
    values = {"tmp": tmp_path, "hf": request.getfixturevalue("hf") if "{hf}" in args else None}
    out = subprocess.run([sys.executable, str(BENCH / script), *(a.format(**values) for a in args)],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert re.search(result, out.stdout, re.M), out.stdout[-3000:]
