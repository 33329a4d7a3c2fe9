"""The wheel a user installs (`pip install kimi-mlx`, not the editable checkout) holds every file the kernels,
the demo and the chat page read at run time."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_wheel_holds_every_kernel_source_the_demo_and_the_chat_page(tmp_path):
    import metal_kernels

    # from a clean copy: a checkout's build/ and *.egg-info from earlier builds can add files the package data misses
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", ".venv*", ".device", ".git",
                                                              "__pycache__", ".pytest_cache"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("kimi_mlx-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    needed = {"metal_kernels/common.h", "metal_kernels/metal.h", "metal_kernels/cuda.h"}
    for spec in metal_kernels.SPECS.values():
        body = ROOT / "metal_kernels" / f"{spec.source or spec.name}.body"
        needed.add(f"metal_kernels/{body.name}")
        needed |= {f"metal_kernels/{line[len('GPU_PART('):-1]}.part" for line in body.read_text().splitlines()
                   if line.startswith("GPU_PART(")}
    needed |= {f"kimi_mlx/demo_data/{p.name}" for p in (ROOT / "kimi_mlx" / "demo_data").iterdir() if p.is_file()}
    needed |= {f"kimi_mlx/server/static/{p.name}" for p in (ROOT / "kimi_mlx" / "server" / "static").iterdir()}
    assert needed <= names, sorted(needed - names)
