"""Compile a kernel's generated CUDA text with NVIDIA's own compilers, without a GPU: NVRTC (what MLX's CUDA
backend compiles custom kernels with) to sm_90 PTX, then ptxas for the kernel's registers, stack frame and spills.
Uses the nvidia-cuda-nvrtc / -nvcc / -runtime wheels (the `test` extra on Linux x86_64); `available()` is False
elsewhere. The prelude stands in for what MLX prepends (its device utils and cooperative_groups): the bf16/fp16
types and the integer types the generated signatures name."""

from __future__ import annotations

import ctypes
import re
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

PRELUDE = ("#include <cuda_bf16.h>\n#include <cuda_fp16.h>\nnamespace cooperative_groups {}\n"
           "typedef unsigned int uint32_t;\ntypedef int int32_t;\n")


def _root(pkg: str) -> Path | None:
    try:
        module = __import__(f"nvidia.{pkg}", fromlist=["_"])
    except ImportError:
        return None
    return Path(list(module.__path__)[0])


@cache
def _tools():
    nvrtc, nvcc, runtime = _root("cuda_nvrtc"), _root("cuda_nvcc"), _root("cuda_runtime")
    if not (nvrtc and nvcc and runtime):
        return None
    libs = sorted((nvrtc / "lib").glob("libnvrtc.so*"))
    ptxas = nvcc / "bin" / "ptxas"
    if not libs or not ptxas.exists():
        return None
    lib = ctypes.CDLL(str(next((p for p in libs if "alt" not in p.name), libs[0])))
    return lib, ptxas, [runtime / "include", nvrtc / "include"]


def available() -> bool:
    return _tools() is not None


@dataclass
class Resources:
    registers: int
    stack_bytes: int
    spill_bytes: int


def ptx(text: str, name: str) -> str:
    """NVRTC's PTX for sm_90 of PRELUDE + text; RuntimeError with NVRTC's log if it does not compile."""
    lib, _, includes = _tools()
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), (PRELUDE + text).encode(), name.encode(), 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    try:
        opts = [b"--gpu-architecture=compute_90", b"-std=c++17"] + [f"-I{p}".encode() for p in includes]
        failed = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        if failed:
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(log.value.decode(errors="replace"))
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        out = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, out)
        return out.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def resources(text: str, name: str) -> Resources:
    """The kernel's registers, stack frame and spilled bytes on sm_90 (ptxas -v)."""
    _, ptxas, _ = _tools()
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / f"{name}.ptx"
        src.write_text(ptx(text, name))
        out = subprocess.run([str(ptxas), "-arch=sm_90", "-v", str(src), "-o", str(Path(d) / "k.cubin")],
                             capture_output=True, text=True, timeout=300)
    if out.returncode:
        raise RuntimeError(out.stderr)
    log = out.stdout + out.stderr
    stack = re.search(r"(\d+) bytes stack frame", log)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    regs = re.search(r"Used (\d+) registers", log)
    if not (stack and regs):
        raise RuntimeError(f"unexpected ptxas output: {log[:500]}")
    return Resources(int(regs.group(1)), int(stack.group(1)), sum(spills))
