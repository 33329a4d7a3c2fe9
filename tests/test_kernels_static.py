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


@pytest.mark.parametrize("name", sorted(SPECS))
def test_included_text_compiles_as_the_same_kernel(name, tmp_path, monkeypatch):
    """On CUDA MLX is given one-line #include sources (metal_kernels.included): the generated kernel with its
    header and body swapped for those lines still compiles, and the files hold exactly the compacted text."""
    import metal_kernels as mk

    monkeypatch.setenv("KIMI_MLX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(mk.TEXT_ENV, raising=False)
    full = rendered()[f"{name}.cu"]
    text = full
    for part in (mk.header("cuda"), mk.body(name, "cuda")):
        given = mk.given_text(part, "cuda")
        assert given.startswith('#include "/') and given.count("\n") == 1
        assert Path(given.split('"')[1]).read_text() == mk.compact(part)
        assert mk.given_text(part, "cuda") == given  # written once, the same name again
        assert part in text
        text = text.replace(part, given)
        last = given.split('"')[1]
    assert len(text) < len(full) / 3
    result = syntax_check(text, "cuda", tmp_path)
    assert result.returncode == 0, result.stderr
    broken = syntax_check(text.replace(last, last + ".missing"), "cuda", tmp_path)
    assert broken.returncode != 0  # (the includes are really read)


def test_given_text_inline_where_asked_or_unwritable(tmp_path, monkeypatch):
    import metal_kernels as mk

    text = "int a; // note\n"
    assert mk.given_text(text, "metal") == mk.compact(text)
    monkeypatch.setenv(mk.TEXT_ENV, "inline")
    monkeypatch.setenv("KIMI_MLX_CACHE", str(tmp_path))
    assert mk.given_text(text, "cuda") == mk.compact(text)
    monkeypatch.delenv(mk.TEXT_ENV)
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("KIMI_MLX_CACHE", str(blocker))  # a file where the folder would go: cannot write
    assert mk.given_text(text, "cuda") == mk.compact(text)
