"""Static checks of the kernel text: the generated .metal/.cu files are current, and g++ accepts
them as C++ against shim headers that declare the Metal / CUDA built-ins (syntax and names; the
emulator in test_kda.py and the GPU run check behaviour)."""

import shutil
import subprocess
from pathlib import Path

import pytest

from metal_kernels import HERE, SPECS
from metal_kernels.generate import rendered

SHIMS = Path(__file__).parent / "kernel_shims"
pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed (CI machines have it)")
FILES = sorted(rendered())


def syntax_check(text: str, kind: str, tmp_path: Path) -> subprocess.CompletedProcess:
    src = tmp_path / ("kernel.metal" if kind == "metal" else "kernel.cu")
    src.write_text(text)
    cmd = ["g++", "-std=c++17", "-fsyntax-only", "-Wno-attributes", "-include", str(SHIMS / f"{kind}_shim.h"),
           "-x", "c++", str(src)]
    return subprocess.run(cmd, capture_output=True, text=True)


def kind_of(fname: str) -> str:
    return "metal" if fname.endswith(".metal") else "cuda"


@pytest.mark.parametrize("fname", FILES)
def test_generated_file_is_current(fname):
    path = HERE / fname
    assert path.exists() and path.read_text() == rendered()[fname], (
        f"{fname} is stale: run `python -m metal_kernels.generate`"
    )


@pytest.mark.parametrize("fname", FILES)
def test_kernel_text_compiles(fname, tmp_path):
    result = syntax_check(rendered()[fname], kind_of(fname), tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("kind, good, typo", [
    ("metal", "metal::simd_sum", "metal::simd_summ"),
    ("metal", "const uint3 kda_gid", "const uint3 kda_gdi"),
    ("cuda", "__shfl_xor_sync", "__shfl_xor_synk"),
    ("cuda", "blockIdx.x", "blockIdz.x"),
])
def test_a_typo_is_caught(kind, good, typo, tmp_path):
    name = next(iter(SPECS))
    text = rendered()[f"{name}.{'metal' if kind == 'metal' else 'cu'}"]
    assert good in text
    result = syntax_check(text.replace(good, typo, 1), kind, tmp_path)
    assert result.returncode != 0


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

    for text in (body(name, kind), header(kind)):
        short = compact(text)
        assert len(short) < 0.8 * len(text)
        assert _tokens(short, tmp_path) == _tokens(text, tmp_path)


def test_compact_keeps_string_literals_and_drops_block_comments():
    from metal_kernels import compact

    text = 'int a; /* gone\n still gone */ int b; // gone\n  static_assert(1, "kept // and /* kept */");\n\n'
    assert compact(text) == 'int a;  int b;\nstatic_assert(1, "kept // and /* kept */");\n'
