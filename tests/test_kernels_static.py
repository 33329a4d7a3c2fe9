"""Static checks of the kernel text: the generated .metal/.cu files are current; every Metal text the wrappers
instantiate keeps Metal's rules (libclang, tests/metal_check.py) and fits a threadgroup of an Apple GPU; g++
accepts the CUDA texts against a shim of the CUDA built-ins (syntax and names). The emulator
(tests/kernel_emulator.py) and the GPU runs check behaviour."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import kernel_variants
import metal_check
from metal_kernels import HERE, SPECS
from metal_kernels.generate import CONSTANT_BELOW, render_metal, rendered

SHIMS = Path(__file__).parent / "kernel_shims"
pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed (CI machines have it)")
FILES = sorted(rendered())


def syntax_check(text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """g++ on a CUDA text against kernel_shims/cuda_shim.h (names and syntax; NVRTC in test_kernels_nvrtc.py
    compiles it for the GPU). Metal texts go through metal_check (libclang, as strict as Metal) instead."""
    src = tmp_path / "kernel.cu"
    src.write_text(text)
    cmd = ["g++", "-std=c++17", "-fsyntax-only", "-Wno-attributes", "-include", str(SHIMS / "cuda_shim.h"),
           "-x", "c++", str(src)]
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.mark.parametrize("fname", FILES)
def test_generated_file_is_current(fname):
    path = HERE / fname
    assert path.exists() and path.read_text() == rendered()[fname], (
        f"{fname} is stale: run `python -m metal_kernels.generate`"
    )


@pytest.mark.parametrize("fname", [f for f in FILES if f.endswith(".cu")])
def test_cuda_text_compiles(fname, tmp_path):
    result = syntax_check(rendered()[fname], tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("kind, good, typo", [
    ("metal", "metal::simd_sum", "metal::simd_summ"),
    ("metal", "const uint3 gpu_gid", "const uint3 kda_gdi"),
    ("cuda", "__shfl_xor_sync", "__shfl_xor_synk"),
    ("cuda", "blockIdx.x", "blockIdz.x"),
])
def test_a_typo_is_caught(kind, good, typo, tmp_path):
    spec = next(iter(SPECS.values()))
    text = rendered()[f"{spec.name}.{'metal' if kind == 'metal' else 'cu'}"]
    assert good in text
    if kind == "metal":
        _clang_or_skip()
        assert metal_check.problems(text.replace(good, typo, 1), spec.sample_template)
    else:
        assert syntax_check(text.replace(good, typo, 1), tmp_path).returncode != 0


def _tokens(text: str, tmp_path: Path) -> list[str]:
    """text's tokens after g++'s own comment removal (no macro expansion, no includes), whitespace dropped."""
    src = tmp_path / "t.cc"
    src.write_text(text)
    out = subprocess.run(["g++", "-fpreprocessed", "-dD", "-E", "-P", "-x", "c++", str(src)],
                         capture_output=True, text=True, check=True).stdout
    return out.split()


@pytest.mark.parametrize("kind", ["metal", "cuda"])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_compacted_text_keeps_every_token(name, kind, tmp_path):
    """What MLX is given (compact: comments, indentation and blank lines dropped) is the same program."""
    from metal_kernels import body, compact, header

    for text in (body(name, kind), header(kind, name)):
        short = compact(text)
        assert len(short) < 0.8 * len(text)
        assert _tokens(short, tmp_path) == _tokens(text, tmp_path)


def test_compact_keeps_string_literals_and_drops_block_comments():
    from metal_kernels import compact

    text = 'int a; /* gone\n still gone */ int b; // gone\n  static_assert(1, "kept // and /* kept */");\n\n'
    assert compact(text) == 'int a;  int b;\nstatic_assert(1, "kept // and /* kept */");\n'


# --- Metal's own rules (tests/metal_check.py: libclang parses the Metal text as C++ for OpenCL) ---


THREADGROUP_BYTES = 28 * 1024  # Apple GPUs give a threadgroup 32 KB; 4 KB of it stays spare
THREADS = 1024  # the most threads a threadgroup any Apple GPU (and CUDA) runs


def _clang_or_skip():
    if not metal_check.available():
        if os.environ.get("CI"):  # CI installs the test extras: a missing libclang there is a failure
            pytest.fail("libclang is missing: pip install -e '.[test]'")
        pytest.skip("libclang is not installed (pip install -e '.[test]')")


def _instantiations():
    """One per distinct Metal text the wrappers make at the real shapes: kernel, template, how each input is
    passed (dtype, constant address space or not, by reference or not), output dtypes."""
    seen = {}
    for launch in kernel_variants.launches():
        passing = tuple((t, min(n, CONSTANT_BELOW), nd)
                        for t, n, nd in launch.inputs)
        seen.setdefault((launch.name, launch.template, passing, launch.outputs), launch)
    return list(seen)


INSTANTIATIONS = _instantiations()


def _metal(name, template, inputs, outputs) -> str:
    return render_metal(SPECS[name], template, inputs, outputs)


@pytest.mark.parametrize("fname", [f for f in FILES if f.endswith(".metal")])
def test_generated_metal_file_keeps_metals_rules(fname):
    _clang_or_skip()
    spec = SPECS[fname.removesuffix(".metal")]
    assert metal_check.problems(rendered()[fname], spec.sample_template) == []


def test_the_wrappers_instantiate_every_kernel_at_the_real_shapes():
    assert {i[0] for i in INSTANTIATIONS} == set(SPECS)
    quantized = {(dict(t)["BITS"], dict(t)["GS"]) for n, t, *_ in INSTANTIATIONS if n == "moe_gate_up"}
    assert quantized == {(b, g) for b in (2, 4, 8) for g in (32, 64, 128)}
    assert any(n < CONSTANT_BELOW for *_, inputs, _ in INSTANTIATIONS for _, n, _ in inputs)  # eps, scale, last


@pytest.mark.parametrize("name, template, inputs, outputs", INSTANTIATIONS,
                         ids=[f"{n}-" + "-".join(f"{k}{v}" for k, v in t) for n, t, *_ in INSTANTIATIONS])
def test_every_instantiation_keeps_metals_rules(name, template, inputs, outputs):
    _clang_or_skip()
    assert metal_check.problems(_metal(name, template, inputs, outputs), template) == []


def _sample(name):
    spec = SPECS[name]
    return render_metal(spec), spec.sample_template


@pytest.mark.parametrize("word", ["half", "bfloat", "float4", "uint3", "threadgroup", "device"])
def test_a_metal_keyword_or_type_as_a_name_is_caught(word):
    """What g++ let through: `for (int half = 0; ...)` in moe_gate_up (its shim's half a typedef a name may shadow)."""
    _clang_or_skip()
    text, template = _sample("moe_gate_up")
    assert "int gu = 0" in text
    found = metal_check.problems(re.sub(r"\bgu\b", word, text), template)
    assert found, word


@pytest.mark.parametrize("name, call", [
    ("add_norm", "gpu_round_as(eps, 1.0f);"),  # a constant buffer where a device pointer is taken
    ("add_norm", "gpu_round_as(part, 1.0f);"),  # threadgroup memory where a device pointer is taken
    ("moe_down", "{ device float* p = part; p[0] = 0.0f; }"),
    ("kda_decode", "{ const constant float* p = a_log; (void)p; }"),  # a device buffer as a constant one
])
def test_an_address_space_mismatch_is_caught(name, call):
    _clang_or_skip()
    text, template = _sample(name)
    assert metal_check.problems(text, template) == []
    assert metal_check.problems(text.replace("\n}\n\ntemplate [[host_name", f"\n{call}\n}}\n\ntemplate [[host_name", 1),
                                template)


def test_a_0d_input_passed_by_reference_does_not_compile():
    """MLX passes a 0-d input as `const constant T&`: `eps[0]` then fails, which is why metal_kernels.launch
    refuses 0-d inputs (tests/test_kernel_probe.py)."""
    _clang_or_skip()
    spec = SPECS["add_norm"]
    inputs = [(t, n, 0 if arg == "eps" else 1) for arg, (t, n) in zip(spec.inputs, spec.sample_inputs)]
    text = render_metal(spec, inputs=inputs)
    assert "const constant float& eps" in text
    assert any("subscripted" in p or "eps" in p for p in metal_check.problems(text, spec.sample_template))


@pytest.mark.parametrize("name, template", sorted({(n, t) for n, t, *_ in INSTANTIATIONS}),
                         ids=[f"{n}-" + "-".join(f"{k}{v}" for k, v in t)
                              for n, t in sorted({(n, t) for n, t, *_ in INSTANTIATIONS})])
def test_threadgroup_memory_fits_apple_gpus_with_headroom(name, template):
    _clang_or_skip()
    spec = SPECS[name]
    assert metal_check.threadgroup_bytes(render_metal(spec, template), template) <= THREADGROUP_BYTES


def test_threadgroup_bytes_are_counted():
    """kda_intra_chunk's shared array at C = 64: max(9 * C * 8, C * C) floats (slices and factors, then A)."""
    _clang_or_skip()
    text, template = _sample("kda_intra_chunk")
    assert dict(template)["C"] == 64
    assert metal_check.threadgroup_bytes(text, template) == 4 * 64 * 72


def test_threads_per_threadgroup_stay_within_1024():
    for launch in kernel_variants.launches():
        assert launch.threadgroup[0] * launch.threadgroup[1] * launch.threadgroup[2] <= THREADS, launch
