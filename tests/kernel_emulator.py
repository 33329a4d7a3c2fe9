"""Run a kernel's generated Metal or CUDA text on the CPU (g++; a GPU thread is a fiber, kernel_shims/emulate.h).

This checks the behaviour of the exact text both backends compile, on tiny shapes, without a GPU:
`emulate(name, kind, inputs, template, grid, threadgroup, output_shapes, output_dtypes)` mirrors
the call of an `mx.fast.metal_kernel` / `mx.fast.cuda_kernel` object.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
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
SEED = int(os.environ.get("KIMI_MLX_EMU_SEED", "1"))  # the scheduler's default seed (another explores other orders)
TAIL = 4096  # the least elements of tail after each buffer (a tail is as long as its buffer, when longer)
GUARD = b"\xa5"  # the byte an output's tail holds, and must still hold after the launch
last_run: threading.Thread | None = None  # the latest launch (a test of the watchdog waits for it to end)


def available() -> bool:
    return shutil.which("g++") is not None and shutil.which("nm") is not None


def _launcher(spec, kind, template, inputs, outputs) -> str:
    types = {"float32": "float", "bfloat16": "bfloat16_t" if kind == "metal" else "__nv_bfloat16", "int32": "int32_t", "uint32": "uint32_t"}
    args = [f"(const {types[t]}*)bufs[{i}]" for i, (t, _) in enumerate(inputs)]
    args += [f"({types[t]}*)bufs[{len(inputs) + j}]" for j, t in enumerate(outputs)]
    name = kernel_name(spec, kind, template, inputs, outputs)
    if kind == "metal":
        call = f"{name}<{', '.join(str(v) for _, v in template)}>({', '.join(args)}, emu_me().gid);"
    else:
        call = f"mlx::core::cu::{name}({', '.join(args)});"
    return f"""
static thread_local void** emu_bufs;
static void emu_entry() {{
  void** const bufs = emu_bufs;
  {call}
}}
// shared_off: each threadgroup array's address as an offset from emu_launch's (read from the symbol table).
extern "C" __attribute__((visibility("default")))
int emu_launch(void** bufs, const unsigned* grid, const unsigned* group, unsigned seed, const long* shared_off,
               const unsigned long* shared_bytes, unsigned n_shared) {{
  char* const base = reinterpret_cast<char*>(&emu_launch);
  std::vector<char*> shared_at(n_shared);
  for (unsigned i = 0; i < n_shared; ++i) shared_at[i] = base + shared_off[i];
  emu_bufs = bufs;
  return emu_run(emu_entry, {"true" if kind == "cuda" else "false"}, grid, group, seed, shared_at.data(),
                 shared_bytes, n_shared);
}}
"""


def _build(text: str, kind: str) -> ctypes.CDLL:
    BUILD.mkdir(exist_ok=True)
    # hidden: a library's kernel (and its threadgroup arrays) binds to itself, not to the same kernel's symbols in
    # another library loaded earlier (a template's statics would otherwise be unique process-wide symbols)
    flags = ["-std=c++20", "-O1", "-shared", "-fPIC", "-fvisibility=hidden", "-Wno-attributes"]
    flags += ["-DEMU_CUDA"] if kind == "cuda" else []
    key = hashlib.sha256((text + SHIM.read_text() + " ".join(flags)).encode()).hexdigest()[:16]
    lib = BUILD / f"{kind}_{key}.so"
    if not lib.exists():
        src = BUILD / f"{kind}_{key}.cpp"
        src.write_text(text)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")  # renamed into place: a concurrent run never loads half a file
        cmd = ["g++", *flags, "-include", str(SHIM), "-x", "c++", str(src), "-o", str(tmp)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        tmp.replace(lib)
    return ctypes.CDLL(str(lib))


@functools.cache
def _shared_arrays(lib: str, kernel: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offset from emu_launch, bytes) of each threadgroup array of `kernel` in library `lib`: the function-local
    statics of the kernel (GPU_SHARED declares them static; a kernel has no other static variables), found by
    their mangled names (_ZZ<function>E<name>) among the library's writable data symbols."""
    out = subprocess.run(["nm", "-S", "--defined-only", lib], check=True, capture_output=True, text=True).stdout
    launch, arrays = None, []
    for line in out.splitlines():
        f = line.split()
        if len(f) == 4 and f[3] == "emu_launch":
            launch = int(f[0], 16)
        elif len(f) == 4 and f[2] in "bBdDuvV" and f[3].startswith("_ZZ") and kernel in f[3]:
            arrays.append((int(f[0], 16), int(f[1], 16)))
    assert launch is not None, f"no emu_launch in {lib}"
    return tuple(a - launch for a, _ in arrays), tuple(n for _, n in arrays)


def _to_numpy(x: mx.array) -> np.ndarray:
    if x.dtype == mx.bfloat16:
        return np.ascontiguousarray(np.array(x.view(mx.uint16)))
    if x.dtype in (mx.int32, mx.uint32):
        return np.ascontiguousarray(np.array(x))
    return np.ascontiguousarray(np.array(x.astype(mx.float32)))


def _with_tail(a: np.ndarray, body, tail) -> np.ndarray:
    """A flat buffer of a's elements (or `body` in each) followed by a tail of max(TAIL, a.size) elements: `tail`
    in each, or (bytes) that byte in each byte."""
    buf = np.empty(a.size + max(TAIL, a.size), a.dtype)
    buf[:a.size] = a.ravel() if body is None else body
    if isinstance(tail, bytes):
        buf[a.size:].view(np.uint8)[:] = tail[0]
    else:
        buf[a.size:] = tail
    return buf


def emulate(name, kind, inputs, template, grid, threadgroup, output_shapes, output_dtypes, seed=None):
    """Run kernel `name` as `kind` ('metal' or 'cuda') text; returns the outputs as mx arrays. seed: the
    scheduler's (default SEED), which picks the order the threads of a group run in between barriers.

    The launch is the one MLX makes: Metal covers grid with ceil(grid / threadgroup) groups per axis whose last
    one holds only the threads inside the grid; CUDA runs ceil(grid / threadgroup) whole blocks. Every buffer is
    followed by a tail: NaN after a float input (a read past the end spreads NaN), and after an output a guard
    pattern that must survive the launch (a write past the end raises)."""
    spec = SPECS[name]
    if not all(isinstance(v, int) and v >= 1 for v in (*grid, *threadgroup)):
        raise ValueError(f"grid {grid} and threadgroup {threadgroup} must be positive integers")
    ins = tuple((DTYPES[x.dtype], x.size) for x in inputs)
    outs = tuple(DTYPES[d] for d in output_dtypes)
    render = render_metal if kind == "metal" else render_cuda
    text = render(spec, template, ins, outs) + _launcher(spec, kind, template, ins, outs)
    lib = _build(text, kind)
    offsets, sizes = _shared_arrays(lib._name, kernel_name(spec, kind, template, ins, outs))
    arrays = []
    for x, a in zip(inputs, (_to_numpy(x) for x in inputs)):
        nan = {mx.float32: np.nan, mx.bfloat16: 0x7FC0}.get(x.dtype)
        arrays.append(a if nan is None else _with_tail(a, None, nan))
    # outputs start as junk (NaN; int -7), as MLX leaves them: an element a kernel fails to write fails its test
    junk = {mx.float32: (np.nan, np.float32), mx.bfloat16: (0x7FC0, np.uint16), mx.int32: (-7, np.int32),
            mx.uint32: (0xDEADBEEF, np.uint32)}
    results = []
    for s, d in zip(output_shapes, output_dtypes):
        value, dtype = junk[d]
        results.append(_with_tail(np.empty(s, dtype), value, GUARD))
    bufs = (ctypes.c_void_p * (len(arrays) + len(results)))(*[a.ctypes.data for a in arrays + results])
    dims = [(ctypes.c_uint * 3)(*v) for v in (grid, threadgroup)]
    shared = ((ctypes.c_long * len(offsets))(*offsets), (ctypes.c_ulong * len(sizes))(*sizes))
    seed = SEED if seed is None else seed
    status = []
    # on a watchdog thread: a kernel that never ends (a loop that never exits) fails the test instead of hanging
    # it; threads stuck at barriers end the launch themselves (status 1)
    run = threading.Thread(target=lambda: status.append(lib.emu_launch(bufs, *dims, ctypes.c_uint(seed), *shared,
                                                                       ctypes.c_uint(len(sizes)))), daemon=True)
    run.keep = (arrays, results, dims, shared)  # the buffers live as long as the thread that writes them
    global last_run
    last_run = run
    run.start()
    run.join(TIMEOUT_S)
    if run.is_alive():
        raise RuntimeError(f"emulated kernel {name} ({kind}) did not finish in {TIMEOUT_S} s: a loop that never ends?")
    if status[0] == 1:
        raise RuntimeError(f"emulated kernel {name} ({kind}): deadlock: threads wait at different barriers (or at "
                           "a barrier that other threads of their group never reach)")
    if status[0] != 0:
        raise RuntimeError(f"emulated kernel {name} ({kind}): could not map the threads' stacks")
    out = []
    for arg, r, s, d in zip(spec.outputs, results, output_shapes, output_dtypes):
        n = int(np.prod(s))
        tail = r[n:].view(np.uint8)
        if (tail != GUARD[0]).any():
            at = int(np.flatnonzero(tail != GUARD[0])[0]) // r.itemsize
            raise RuntimeError(f"emulated kernel {name} ({kind}) wrote past the end of output {arg!r} (shape "
                               f"{tuple(s)}): element {n + at} of its buffer")
        r = r[:n].reshape(s)
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
