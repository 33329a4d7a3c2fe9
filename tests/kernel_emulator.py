"""Run a kernel's generated Metal or CUDA text on the CPU (g++ + one thread per GPU thread).

This checks the behaviour of the exact text both backends compile, on tiny shapes, without a GPU:
`emulate(name, kind, inputs, template, grid, threadgroup, output_shapes, output_dtypes)` mirrors
the call of an `mx.fast.metal_kernel` / `mx.fast.cuda_kernel` object.
"""

from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
import tempfile
import threading
from functools import partial
from pathlib import Path

import mlx.core as mx
import numpy as np

import metal_kernels
from metal_kernels import SPECS
from metal_kernels.generate import kernel_name, render_cuda, render_metal

SHIM = Path(__file__).parent / "kernel_shims" / "emulate.h"
DTYPES = {mx.float32: "float32", mx.bfloat16: "bfloat16", mx.int32: "int32", mx.uint32: "uint32"}
BUILD = Path(tempfile.gettempdir()) / "kimi_mlx_kernel_emulator"
TIMEOUT_S = 300
last_run: threading.Thread | None = None  # the latest launch (a test of the watchdog waits for it to end)


def available() -> bool:
    return shutil.which("g++") is not None


def _launcher(spec, kind, template, inputs, outputs) -> str:
    types = {"float32": "float", "bfloat16": "bfloat16_t" if kind == "metal" else "__nv_bfloat16", "int32": "int32_t", "uint32": "uint32_t"}
    args = [f"(const {types[t]}*)bufs[{i}]" for i, (t, _) in enumerate(inputs)]
    args += [f"({types[t]}*)bufs[{len(inputs) + j}]" for j, t in enumerate(outputs)]
    name = kernel_name(spec, kind, template, inputs, outputs)
    if kind == "metal":
        call = f"{name}<{', '.join(str(v) for _, v in template)}>({', '.join(args)}, gid);"
        setup = "uint3 gid = {bx * tx + x, by * ty + y, bz * tz + z};"
    else:
        call = f"mlx::core::cu::{name}({', '.join(args)});"
        setup = "threadIdx = {x, y, z}; blockIdx = {bx, by, bz}; blockDim = {tx, ty, tz};"
    return f"""
#include <memory>
#include <thread>
#include <vector>
extern "C" void emu_launch(void** bufs, unsigned gx, unsigned gy, unsigned gz,
                           unsigned tx, unsigned ty, unsigned tz) {{
  const unsigned n = tx * ty * tz;
  for (unsigned bz = 0; bz < gz / tz; ++bz)
    for (unsigned by = 0; by < gy / ty; ++by)
      for (unsigned bx = 0; bx < gx / tx; ++bx) {{
        auto groups = std::make_unique<EmuGroup[]>(n / 32);
        std::barrier<> block(n);
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < n; ++t)
          threads.emplace_back([&, t] {{
            const unsigned x = t % tx, y = (t / tx) % ty, z = t / (tx * ty);
            emu_group = &groups[t / 32];
            emu_block = &block;
            emu_lane = t % 32;
            {setup}
            {call}
          }});
        for (auto& th : threads) th.join();
      }}
}}
"""


def _build(text: str, kind: str) -> ctypes.CDLL:
    BUILD.mkdir(exist_ok=True)
    key = hashlib.sha256((text + SHIM.read_text()).encode()).hexdigest()[:16]
    lib = BUILD / f"{kind}_{key}.so"
    if not lib.exists():
        src = BUILD / f"{kind}_{key}.cpp"
        src.write_text(text)
        flags = ["-DEMU_CUDA"] if kind == "cuda" else []
        cmd = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wno-attributes", *flags,
               "-include", str(SHIM), "-x", "c++", str(src), "-o", str(lib)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(lib))


def _to_numpy(x: mx.array) -> np.ndarray:
    if x.dtype == mx.bfloat16:
        return np.ascontiguousarray(np.array(x.view(mx.uint16)))
    if x.dtype in (mx.int32, mx.uint32):
        return np.ascontiguousarray(np.array(x))
    return np.ascontiguousarray(np.array(x.astype(mx.float32)))


def emulate(name, kind, inputs, template, grid, threadgroup, output_shapes, output_dtypes):
    """Run kernel `name` as `kind` ('metal' or 'cuda') text; returns the outputs as mx arrays."""
    spec = SPECS[name]
    ins = tuple((DTYPES[x.dtype], x.size) for x in inputs)
    outs = tuple(DTYPES[d] for d in output_dtypes)
    render = render_metal if kind == "metal" else render_cuda
    text = render(spec, template, ins, outs) + _launcher(spec, kind, template, ins, outs)
    lib = _build(text, kind)
    arrays = [_to_numpy(x) for x in inputs]
    # outputs start as junk (NaN; int -7), as MLX leaves them: an element a kernel fails to write fails its test
    junk = {mx.float32: (np.nan, np.float32), mx.bfloat16: (0x7FC0, np.uint16), mx.int32: (-7, np.int32),
            mx.uint32: (0xDEADBEEF, np.uint32)}
    results = [np.full(s, *junk[d]) for s, d in zip(output_shapes, output_dtypes)]
    bufs = (ctypes.c_void_p * (len(arrays) + len(results)))(*[a.ctypes.data for a in arrays + results])
    # on a watchdog thread: a kernel whose threads never meet at a barrier fails the test instead of hanging it
    run = threading.Thread(target=lib.emu_launch, args=(bufs, *[ctypes.c_uint(v) for v in (*grid, *threadgroup)]),
                           daemon=True)
    run.keep = (arrays, results)  # the buffers live as long as the thread that writes them
    global last_run
    last_run = run
    run.start()
    run.join(TIMEOUT_S)
    if run.is_alive():
        raise RuntimeError(f"emulated kernel {name} ({kind}) did not finish in {TIMEOUT_S} s: threads stuck at a barrier?")
    out = []
    for r, d in zip(results, output_dtypes):
        out.append(mx.array(r).view(mx.bfloat16) if d == mx.bfloat16 else mx.array(r))
    return out


def emulated_kernel(kind: str, name: str):
    """A call of kernel `name`'s `kind` text here, with MLX's kernel-call arguments."""
    def call(inputs, template, grid, threadgroup, output_shapes, output_dtypes):
        return emulate(name, kind, inputs, tuple(template), grid=grid, threadgroup=threadgroup,
                       output_shapes=output_shapes, output_dtypes=output_dtypes)
    return call


def kernel_factory(kind: str):
    """A stand-in for metal_kernels.kernel: launchers (metal_kernels.launch: inputs checked, evaluated at once
    while probing) whose calls run the generated text here, so the ops wrappers (argument order, templates, grids,
    output shapes) are checked on the CPU too."""
    def make(name: str):
        return partial(metal_kernels.launch, name, emulated_kernel(kind, name))
    return make
