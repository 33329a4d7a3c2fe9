"""Custom kernels: one algorithm source per kernel, built for Metal or CUDA by MLX.

Each kernel body (`<name>.body`) is written once in a small vocabulary: `gpu_gid` (the thread's
uint3 position in the grid), `GPU_FN` helpers from common.h, and the primitives that metal.h and
cuda.h define per backend (`gpu_exp`, `gpu_simd_sum`, ...). MLX writes the function signature from
the input/output names and the template arguments, so the same body compiles as
`mx.fast.metal_kernel` on Apple GPUs and as `mx.fast.cuda_kernel` on NVIDIA GPUs. Code kept apart
from a body lives in `<part>.part` and is pasted at a body's `GPU_PART(<part>)` line (moe_pick: one token's
routing, in moe_route); a spec's `defines` select a body's variants (`#if`). `generate.py`
writes the full text MLX compiles for a sample instantiation (`<name>.metal`, `<name>.cu`) so CI
can check it without either GPU; MLX itself is given that text without comments or indentation
(`compact`). Kernels are built lazily and only for a backend that exists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from contextlib import contextmanager
from functools import cache, partial
from pathlib import Path

import mlx.core as mx

HERE = Path(__file__).parent

THREAD_IDS = {
    "metal": "const uint3 gpu_gid = thread_position_in_grid;\n",
    "cuda": (
        "const uint3 gpu_gid = make_uint3(blockIdx.x * blockDim.x + threadIdx.x,\n"
        "                                 blockIdx.y * blockDim.y + threadIdx.y,\n"
        "                                 blockIdx.z * blockDim.z + threadIdx.z);\n"
    ),
}


@dataclass(frozen=True)
class KernelSpec:
    """Names of a kernel's buffers, and a sample instantiation for the generated files."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    sample_template: tuple[tuple[str, int], ...] = ()
    sample_inputs: tuple[tuple[str, int], ...] = ()  # (dtype name, element count) per input
    sample_outputs: tuple[str, ...] = ()  # dtype name per output
    source: str = ""  # the body file's stem when it is another kernel's (default: name)
    defines: tuple[tuple[str, int], ...] = ()  # macros set before the body (variants of one source)
    tiles: bool = False  # uses the matrix-unit tile helpers (<backend>_tile.h), which only these kernels include


SPECS = {
    "kda_decode": KernelSpec(
        name="kda_decode",
        inputs=("qkv", "conv_tail", "conv_w", "gate_a", "dt_bias", "a_log", "state_in", "beta_logit", "gate_b",
                "norm_w", "eps"),
        outputs=("out", "state_out", "tail_out"),
        sample_template=(("NH", 32), ("DK", 128), ("DV", 128), ("KW", 4), ("G", 16)),
        sample_inputs=(
            ("bfloat16", 12288),
            ("bfloat16", 3 * 12288),
            ("bfloat16", 4 * 12288),
            ("bfloat16", 4096),
            ("float32", 4096),
            ("float32", 32),
            ("float32", 32 * 128 * 128),
            ("bfloat16", 32),
            ("bfloat16", 4096),
            ("float32", 128),
            ("float32", 1),
        ),
        sample_outputs=("bfloat16", "float32", "bfloat16"),
        defines=(("KDA_GATES", 0),),
    ),
    "kda_decode_gates": KernelSpec(  # kda_decode with the f_b and g_b projections applied inside
        name="kda_decode_gates",
        inputs=("qkv", "conv_tail", "conv_w", "gates", "dt_bias", "a_log", "state_in", "f_wq", "f_scales", "f_biases",
                "g_wq", "g_scales", "g_biases", "norm_w", "eps"),
        outputs=("out", "state_out", "tail_out"),
        sample_template=(("NH", 32), ("DK", 128), ("DV", 128), ("KW", 4), ("G", 16), ("BITS", 8), ("GS", 64)),
        sample_inputs=(
            ("bfloat16", 12288),
            ("bfloat16", 3 * 12288),
            ("bfloat16", 4 * 12288),
            ("bfloat16", 288),
            ("float32", 4096),
            ("float32", 32),
            ("float32", 32 * 128 * 128),
            ("uint32", 4096 * 32),
            ("bfloat16", 4096 * 2),
            ("bfloat16", 4096 * 2),
            ("uint32", 4096 * 32),
            ("bfloat16", 4096 * 2),
            ("bfloat16", 4096 * 2),
            ("float32", 128),
            ("float32", 1),
        ),
        sample_outputs=("bfloat16", "float32", "bfloat16"),
        source="kda_decode",
        defines=(("KDA_GATES", 1),),
    ),
    "kda_decode_rows": KernelSpec(  # kda_decode over NT consecutive tokens, every token's state kept
        name="kda_decode_rows",
        inputs=("qkv", "conv_tail", "conv_w", "gate_a", "dt_bias", "a_log", "state_in", "beta_logit", "gate_b",
                "norm_w", "eps"),
        outputs=("out", "state_out", "tail_out"),
        sample_template=(("NH", 32), ("DK", 128), ("DV", 128), ("KW", 4), ("G", 16), ("NT", 9)),
        sample_inputs=(
            ("bfloat16", 9 * 12288),
            ("bfloat16", 3 * 12288),
            ("bfloat16", 4 * 12288),
            ("bfloat16", 9 * 4096),
            ("float32", 4096),
            ("float32", 32),
            ("float32", 32 * 128 * 128),
            ("bfloat16", 9 * 32),
            ("bfloat16", 9 * 4096),
            ("float32", 128),
            ("float32", 1),
        ),
        sample_outputs=("bfloat16", "float32", "bfloat16"),
    ),
    "kda_chunk_scan": KernelSpec(
        name="kda_chunk_scan",
        inputs=("w", "u", "q_in", "k_out", "decay_all", "state_in", "sizes"),
        outputs=("v_new", "q_state", "state_out"),
        sample_template=(("NH", 32), ("DK", 128), ("DV", 128), ("C", 64), ("R", 4)),
        sample_inputs=(
            ("float32", 128 * 32 * 64 * 128),
            ("float32", 128 * 32 * 64 * 128),
            ("float32", 128 * 32 * 64 * 128),
            ("float32", 128 * 32 * 64 * 128),
            ("float32", 128 * 32 * 128),
            ("float32", 32 * 128 * 128),
            ("int32", 2),
        ),
        sample_outputs=("float32", "float32", "float32"),
    ),
    "kda_intra_chunk": KernelSpec(
        name="kda_intra_chunk",
        inputs=("q_in", "k_in", "g", "beta"),
        outputs=("a_qk", "t_inv"),
        sample_template=(("DK", 128), ("C", 64)),
        sample_inputs=(
            ("float32", 1024 * 64 * 128),
            ("float32", 1024 * 64 * 128),
            ("float32", 1024 * 64 * 128),
            ("float32", 1024 * 64),
        ),
        sample_outputs=("float32", "float32"),
    ),
    "kda_intra_chunk_mma": KernelSpec(
        name="kda_intra_chunk_mma",
        inputs=("q_in", "k_in", "g", "beta"),
        outputs=("a_qk", "t_inv"),
        sample_template=(("DK", 128), ("C", 64)),
        sample_inputs=(
            ("float32", 1024 * 64 * 128),
            ("float32", 1024 * 64 * 128),
            ("float32", 1024 * 64 * 128),
            ("float32", 1024 * 64),
        ),
        sample_outputs=("float32", "float32"),
        tiles=True,
    ),
    "kda_scan_mma": KernelSpec(
        name="kda_scan_mma",
        inputs=("a_t", "b", "state_in", "sizes"),
        outputs=("starts", "state_out"),
        sample_template=(("DK", 128), ("DV", 128)),
        sample_inputs=(
            ("float32", 128 * 32 * 128 * 128),
            ("float32", 128 * 32 * 128 * 128),
            ("float32", 32 * 128 * 128),
            ("int32", 2),
        ),
        sample_outputs=("float32", "float32"),
        tiles=True,
    ),
    "add_norm": KernelSpec(
        name="add_norm",
        inputs=("h", "a", "w", "eps"),
        outputs=("s", "y"),
        sample_template=(("D", 2304), ("S", 8)),
        sample_inputs=(("bfloat16", 2304), ("float32", 2304), ("bfloat16", 2304), ("float32", 1)),
        sample_outputs=("bfloat16", "bfloat16"),
    ),
    "kda_gated_norm": KernelSpec(
        name="kda_gated_norm",
        inputs=("o", "gate", "w", "eps"),
        outputs=("y",),
        sample_template=(("D", 128),),
        sample_inputs=(("float32", 4096), ("bfloat16", 4096), ("float32", 128), ("float32", 1)),
        sample_outputs=("bfloat16",),
    ),
    "mla_cache_row": KernelSpec(
        name="mla_cache_row",
        inputs=("ckv", "w", "eps"),
        outputs=("rows",),
        sample_template=(("L", 512), ("W", 576)),
        sample_inputs=(("bfloat16", 576), ("bfloat16", 512), ("float32", 1)),
        sample_outputs=("bfloat16",),
    ),
    "mla_decode_page": KernelSpec(
        name="mla_decode_page",
        inputs=("qa", "page", "last", "dims"),
        outputs=("part", "most", "total"),
        sample_template=(("H", 32), ("W", 576), ("HG", 8), ("NW", 4), ("R", 64)),
        sample_inputs=(("bfloat16", 32 * 576), ("bfloat16", 2048 * 576), ("int32", 1), ("int32", 2)),
        sample_outputs=("float32", "float32", "float32"),
    ),
    "mla_decode_merge": KernelSpec(
        name="mla_decode_merge",
        inputs=("part", "most", "total", "dims"),
        outputs=("o",),
        sample_template=(("H", 32), ("W", 576), ("NW", 8)),
        sample_inputs=(("float32", 32 * 32 * 576), ("float32", 32 * 32), ("float32", 32 * 32), ("int32", 1)),
        sample_outputs=("bfloat16",),
    ),
    "mla_decode_chunks": KernelSpec(
        name="mla_decode_chunks",
        inputs=("s", "last", "dims"),
        outputs=("e", "most", "total"),
        sample_template=(("H", 32), ("C", 512), ("NW", 4)),
        sample_inputs=(("bfloat16", 32 * 131072), ("int32", 1), ("int32", 2)),
        sample_outputs=("bfloat16", "float32", "float32"),
    ),
    "moe_route": KernelSpec(
        name="moe_route",
        inputs=("logits", "bias", "scale"),
        outputs=("idx", "weight"),
        sample_template=(("E", 256), ("K", 8), ("NG", 1), ("TG", 1), ("RENORM", 1), ("BIAS_W", 0), ("SH", 1)),
        sample_inputs=(("float32", 256), ("float32", 256), ("float32", 1)),
        sample_outputs=("int32", "float32"),
    ),
    "moe_router": KernelSpec(
        name="moe_router",
        inputs=("x", "weight"),
        outputs=("logits",),
        sample_template=(("D", 2304), ("E", 256), ("S", 8)),
        sample_inputs=(("bfloat16", 2304), ("float32", 256 * 2304)),
        sample_outputs=("float32",),
    ),
    "moe_gate_up": KernelSpec(
        name="moe_gate_up",
        inputs=("x", "idx", "wq", "scales", "biases"),
        outputs=("h",),
        sample_template=(("D", 2304), ("I", 1024), ("P", 9), ("BITS", 4), ("GS", 64), ("R", 4)),
        sample_inputs=(
            ("bfloat16", 2304),
            ("int32", 9),
            ("uint32", 257 * 2048 * 288),
            ("bfloat16", 257 * 2048 * 36),
            ("bfloat16", 257 * 2048 * 36),
        ),
        sample_outputs=("float32",),
        defines=(("MOE_UNION", 0),),
    ),
    "moe_gate_up_union": KernelSpec(  # moe_gate_up reading each expert of a batch's union once
        name="moe_gate_up_union",
        inputs=("x", "idx", "order", "pairs", "wq", "scales", "biases"),
        outputs=("h",),
        sample_template=(("D", 2304), ("I", 1024), ("P", 9), ("BITS", 4), ("GS", 64), ("R", 4), ("TB", 4)),
        sample_inputs=(
            ("bfloat16", 8 * 2304),
            ("int32", 8 * 9),
            ("int32", 8 * 9),
            ("int32", 1),
            ("uint32", 257 * 2048 * 288),
            ("bfloat16", 257 * 2048 * 36),
            ("bfloat16", 257 * 2048 * 36),
        ),
        sample_outputs=("float32",),
        source="moe_gate_up",
        defines=(("MOE_UNION", 1),),
    ),
    "moe_gate_up_wide": KernelSpec(  # moe_gate_up's result, the packed words read 16 bytes a load
        name="moe_gate_up_wide",
        inputs=("x", "idx", "wq", "scales", "biases"),
        outputs=("h",),
        sample_template=(("D", 2304), ("I", 1024), ("P", 9), ("BITS", 4), ("GS", 64), ("R", 2)),
        sample_inputs=(
            ("bfloat16", 2304),
            ("int32", 9),
            ("uint32", 257 * 2048 * 288),
            ("bfloat16", 257 * 2048 * 36),
            ("bfloat16", 257 * 2048 * 36),
        ),
        sample_outputs=("float32",),
    ),
    "moe_down_wide": KernelSpec(  # moe_down's result, the packed words read 16 bytes a load
        name="moe_down_wide",
        inputs=("h", "idx", "weight", "wq", "scales", "biases"),
        outputs=("y",),
        sample_template=(("D", 2304), ("I", 1024), ("P", 9), ("BITS", 4), ("GS", 64), ("R", 4)),
        sample_inputs=(
            ("float32", 9 * 1024),
            ("int32", 9),
            ("float32", 9),
            ("uint32", 257 * 2304 * 128),
            ("bfloat16", 257 * 2304 * 16),
            ("bfloat16", 257 * 2304 * 16),
        ),
        sample_outputs=("float32",),
    ),
    "moe_down": KernelSpec(
        name="moe_down",
        inputs=("h", "idx", "weight", "wq", "scales", "biases"),
        outputs=("y",),
        sample_template=(("D", 2304), ("I", 1024), ("P", 9), ("BITS", 4), ("GS", 64), ("R", 4)),
        sample_inputs=(
            ("float32", 9 * 1024),
            ("int32", 9),
            ("float32", 9),
            ("uint32", 257 * 2304 * 128),
            ("bfloat16", 257 * 2304 * 16),
            ("bfloat16", 257 * 2304 * 16),
        ),
        sample_outputs=("float32",),
    ),
}



@cache
def sizes(*values: int) -> mx.array:
    """Run-time sizes for a kernel (page rows, chunks, pairs) as an int32 input on the device, made once per value:
    kernels take them as inputs rather than template constants, so they are built once for the model's shape, not
    once per page size or batch, and nothing is made on the host a token (CUDA keeps a host-made array in
    managed memory, which its first reader waits for)."""
    a = mx.array(values, mx.int32)
    mx.eval(a)
    return a


def backend() -> str | None:
    """'metal', 'cuda', or None when MLX has no GPU backend here."""
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return None


def header(kind: str, name: str | None = None) -> str:
    """Text placed before kernel `name`: the backend's primitives, its matrix-unit tiles where the kernel's spec
    asks for them, then the shared helpers."""
    tiles = name is not None and SPECS[name].tiles
    return ((HERE / f"{kind}.h").read_text() + "\n" + ((HERE / f"{kind}_tile.h").read_text() + "\n" if tiles else "")
            + (HERE / "common.h").read_text())


def body(name: str, kind: str) -> str:
    """The kernel body for one backend: its thread-id line, the spec's macros, then the shared algorithm, each
    `GPU_PART(x)` line replaced by the text of x.part (code shared by several bodies)."""
    spec = SPECS[name]
    macros = "".join(f"#define {k} {v}\n" for k, v in spec.defines)
    text = (HERE / f"{spec.source or name}.body").read_text()
    text = re.sub(r"^GPU_PART\((\w+)\)\n", lambda m: (HERE / f"{m.group(1)}.part").read_text(), text, flags=re.M)
    return THREAD_IDS[kind] + macros + text


_COMMENT_OR_STRING = re.compile(r'"(?:\\.|[^"\\\n])*"|//[^\n]*|/\*.*?\*/', re.S)


def compact(text: str) -> str:
    """text without comments, indentation or blank lines (string literals kept): what MLX is given. MLX's CUDA
    backend hashes a custom kernel's whole source at every launch (custom_kernel.cpp: the JIT module's name), so
    every byte dropped is host time saved each decoded token (RESULTS.md measures it)."""
    text = _COMMENT_OR_STRING.sub(lambda m: m.group(0) if m.group(0).startswith('"') else "", text)
    return "".join(line.strip() + "\n" for line in text.splitlines() if line.strip())


def group_rows(n: int, most: int = 8) -> int:
    """32-lane groups per threadgroup for a grid of n groups along y: the largest power of two <= most
    dividing n (the grid must hold whole threadgroups)."""
    t = most
    while n % t:
        t //= 2
    return t


class KernelFailed(RuntimeError):
    """A kernel failed to build or to run while `probing` (name: the kernel, why: MLX's first line)."""

    def __init__(self, name: str, why: str):
        super().__init__(f"{name}: {why}")
        self.name, self.why = name, why


_off: dict[str, str] = {}  # kernel -> why it failed to build or run here (probe_kernels at load): its paths fall back
_probing = False  # every launch evaluated where it is made, a failure raised as KernelFailed naming the kernel


def usable(name: str) -> bool:
    """Whether the paths that launch kernel `name` may take it: not switched off on this machine."""
    return name not in _off


def switched_off() -> dict[str, str]:
    """Kernels switched off on this machine, each with the first line of why."""
    return dict(_off)


def switch_off(name: str, why: str) -> None:
    _off[name] = why


@contextmanager
def probing():
    """Within: each launch is evaluated at once, so a kernel that fails to build or run raises KernelFailed
    naming it (outside, MLX builds a kernel when the graph that holds it is evaluated, and the error names
    none). Used outside compiled functions only."""
    global _probing
    before, _probing = _probing, True
    try:
        yield
    finally:
        _probing = before


def check_inputs(name: str, inputs) -> None:
    """MLX passes a 0-d input to a Metal kernel by reference (`const constant T& x`), where the bodies index
    every input (`x[0]`): such a launch would not compile on a Mac. Inputs are arrays of one element or more."""
    for arg, x in zip(SPECS[name].inputs, inputs):
        if x.ndim == 0:
            raise ValueError(f"kernel {name}: input {arg!r} is 0-d; pass it with shape (1,) (Metal would take it "
                             "by reference, which the kernel's x[0] cannot index)")


@cache
def _built(name: str):
    """The MLX kernel object for `name` on this machine's GPU backend (built once)."""
    kind = backend()
    if kind is None:
        raise RuntimeError(f"kernel {name!r} needs MLX's Metal or CUDA backend; this MLX has neither")
    spec = SPECS[name]
    make = mx.fast.metal_kernel if kind == "metal" else mx.fast.cuda_kernel
    return make(
        name=name,
        input_names=list(spec.inputs),
        output_names=list(spec.outputs),
        source=compact(body(name, kind)),
        header=compact(header(kind, name)),
    )


def launch(name: str, run, inputs, **kw):
    """run(inputs=..., **kw): the launch of kernel `name` by `run` (the MLX kernel, or a test's stand-in), its
    inputs checked, and while probing evaluated at once."""
    check_inputs(name, inputs)
    if not _probing:
        return run(inputs=inputs, **kw)
    try:
        out = run(inputs=inputs, **kw)
        mx.eval(out)
    except (RuntimeError, ValueError) as e:
        text = str(e).strip()
        raise KernelFailed(name, text.splitlines()[0] if text else type(e).__name__) from e
    return out


def kernel(name: str):
    """A launcher of kernel `name` on this machine's GPU backend: called as MLX's kernel objects are
    (inputs=, template=, grid=, threadgroup=, output_shapes=, output_dtypes=)."""
    return partial(launch, name, _built(name))
