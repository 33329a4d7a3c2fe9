"""Every fast-path switch in one list: its environment variable, choices, default and what it does.

The default of each is what runs unless a user sets it: the path choices (ops/*.py, model/fuse.py) take the
fast path where the shapes, the backend and the kernels allow it and the switch says 'auto'. A switch forces a
path for a comparison, a benchmark or a workaround; `kimi-mlx doctor` prints the value each has, and
docs/switches.md is this list as a page (tests/test_settings.py keeps the two the same).

A switch is read when a path is chosen (at trace time for compiled steps), so a test or benchmark may change it
within a process: `override(KIMI_MLX_KDA="ref")` for a block, or the environment. A value outside its choices is
a one-line ConfigError naming the switch and its choices.

Each op's path choice is a pure function of `Facts` (the switches' values, the backend, the kernels switched off
here) and the call's shapes, `choose` or `choose_*` beside the op (ops/kda.py, kda_decode.py, attention.py,
mla_decode.py, routing.py, norm.py, linear.py, model/fuse.py); the op calls it with `now(gpu)`, the facts of
this moment (tests/test_choose.py runs them on tables of facts).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

from .errors import ConfigError

NUMBER = ()  # the choices of a switch that takes a whole number >= 1


@dataclass(frozen=True)
class Switch:
    env: str
    choices: tuple[str, ...]  # NUMBER: a whole number >= 1
    default: str  # "device": a default that depends on the device (default_of)
    doc: str


SWITCHES = {s.env: s for s in (
    Switch("KIMI_MLX_KDA", ("auto", "ref", "chunked", "kernel"), "auto",
           "KDA: auto (chunked prefill from 16 tokens; on a GPU its per-chunk matrices, scan and the decode step "
           "as kernels), ref (the sequential reference everywhere), chunked (all ops), kernel (the kernels always)"),
    Switch("KIMI_MLX_KDA_SCAN", ("auto", "ops", "affine", "doubling", "kernel", "mma"), "auto",
           "the chunked prefill's scan across chunks: auto (a matmul a chunk on CUDA, the scan kernel on Metal, ops "
           "on the CPU), or one of them (doubling: the chunks' affine maps combined in log2(chunks) levels of "
           "batched matmuls; mma: the affine steps in order in one kernel, the state's products on the matrix "
           "units; under mx.compile, as the model runs it, mma measured no faster than affine and doubling is untimed: "
           "RESULTS.md)"),
    Switch("KIMI_MLX_KDA_INTRA", ("auto", "kernel", "mma"), "auto",
           "the chunked prefill's per-chunk matrices on a GPU: auto (kernel), kernel (their products on the CUDA / "
           "SIMD cores), mma (the products as 16x16 tiles on the matrix units: tensor cores, simdgroup matrices; "
           "under mx.compile measured no faster than kernel: RESULTS.md)"),
    Switch("KIMI_MLX_MLA", ("auto", "ref", "fused", "tiled"), "auto",
           "MLA prefill attention: auto (fused SDPA where one score tile holds the cache, else tiled), ref (one "
           "score array), fused, tiled"),
    Switch("KIMI_MLX_MLA_TILE_MB", NUMBER, "device",
           "MLA tiled attention: megabytes of float32 scores a tile (default 64 on the CPU, 256 on a GPU)"),
    Switch("KIMI_MLX_MLA_PAGE", ("on", "off"), "on",
           "MLA decode on a GPU: on (two kernels over a page of up to 8,192 rows, flash decoding beyond), off (the "
           "matmuls)"),
    Switch("KIMI_MLX_ROUTE", ("auto", "ref", "kernel"), "auto",
           "MoE routing: auto (one kernel on a GPU where the expert count fits it), ref (ops), kernel (always)"),
    Switch("KIMI_MLX_NORM", ("auto", "ref"), "auto",
           "residual add + RMS norm in decode: auto (one kernel on a GPU), ref (ops)"),
    Switch("KIMI_MLX_EXPERTS", ("auto", "kernel", "union", "wide", "gather", "sorted", "segmented", "bounded"), "auto",
           "MoE expert matmuls: auto (decode: two kernels on a GPU for affine 2/4/8-bit banks, else MLX's gather "
           "matmuls; prefill: bounded on CUDA, sorted on Metal, segmented on the CPU), or one of them (the prefill "
           "paths only for calls of 64+ token-expert pairs); union: the decode kernels reading each expert of a "
           "batch's tokens once (gate|up), not once a token; wide: the decode kernels reading a row's packed words 16 "
           "bytes a load, every load of a lane issued before its first product (not yet timed on a GPU)"),
    Switch("KIMI_MLX_DEQUANT", ("auto", "on", "off"), "auto",
           "quantized projections of 256+ rows (prefill): auto (dequantized, then one dense matmul, on CUDA), on "
           "(every backend), off (MLX's quantized matmul)"),
    Switch("KIMI_MLX_PAD_ROWS", ("auto", "off"), "auto",
           "quantized projections of 2-7 rows on CUDA (batched decode, speculative verification): auto (the rows "
           "padded to 8 where (rows - 1) x the weight's bytes >= 12 MB, so MLX runs one GEMM that reads the weight "
           "once instead of a mat-vec a row), off (the rows as they are)"),
    Switch("KIMI_MLX_KDA_ROWS", ("auto", "off", "on"), "auto",
           "speculative verification's KDA steps on a GPU: auto (one kernel for all the tokens, kda_decode_rows, "
           "from 5 tokens; below that the decode kernel once a token, which measured faster there), off (the decode "
           "kernel once a token), on (the one kernel at every width)"),
    Switch("KIMI_MLX_DRAFT_WIDTH", ("auto", "max"), "auto",
           "prompt lookup's drafted tokens a round (speculate.DraftWidth): auto (the width whose expected tokens per "
           "unit of the verification's cost is best here, none where plain decoding is better: on a CPU nearly "
           "always none), max (always --num-draft: the mechanism at full width, for tests and comparisons)"),
    Switch("KIMI_MLX_PREFETCH", ("off", "on"), "off",
           "streamed experts (--experts-memory), decode: on (each MoE layer also runs the next one's router on its "
           "own input and starts reading the experts that guess misses while the device computes), off (reads only "
           "what the router asks; benchmarks/offload.py measures both)"),
    Switch("KIMI_MLX_FAST_MATH", ("auto", "off"), "auto",
           "exp, SiLU and softmax on the CPU: auto (range reduction + polynomial: MLX's CPU exp runs an element "
           "at a time), off (MLX's)"),
)}

_overrides: dict[str, str] = {}


def default_of(switch: Switch) -> str:
    if switch.default != "device":
        return switch.default
    import mlx.core as mx

    return "256" if mx.default_device() == mx.gpu else "64"


def value(env: str) -> str:
    """The switch's value now: an override, else the environment (case and spaces ignored; unset or empty: the
    default), checked against its choices."""
    switch = SWITCHES[env]
    default = default_of(switch)
    raw = _overrides[env] if env in _overrides else os.environ.get(env, default)
    v = str(raw).strip().lower() or default
    if switch.choices is NUMBER:
        if not v.isdigit() or int(v) < 1:
            raise ConfigError(f"{env}={v!r} is not a whole number >= 1; unset it or fix it")
    elif v not in switch.choices:
        raise ConfigError(f"{env}={v!r} is not one of {', '.join(switch.choices)}; unset it or pick one")
    return v


@contextmanager
def override(**values: str):
    """Within: these switches take these values whatever the environment says (tests, benchmarks)."""
    unknown = set(values) - set(SWITCHES)
    if unknown:
        raise ConfigError(f"no such switch: {', '.join(sorted(unknown))} (kimi_mlx/settings.py lists them)")
    before = dict(_overrides)
    _overrides.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(before)


def rows() -> list[tuple[str, str, bool]]:
    """(switch, value now, set by the user) for each switch, for the doctor."""
    out = []
    for env, switch in SWITCHES.items():
        out.append((env, value(env), value(env) != default_of(switch)))
    return out


def markdown() -> str:
    """docs/switches.md: every switch with its choices, default and what it does."""
    lines = ["# Fast-path switches", "",
             "Each is an environment variable, read when a path is chosen; unset, the default runs. `kimi-mlx doctor`",
             "prints the value each has on your machine. The list lives in `kimi_mlx/settings.py`; this page is made",
             "from it (`python -c 'from kimi_mlx import settings; print(settings.markdown(), end=\"\")' >",
             "docs/switches.md`). Paths that measured no gain were removed",
             "with their switches: [removed.md](removed.md).", "",
             "| switch | choices | default | what it does |", "|---|---|---|---|"]
    for s in SWITCHES.values():
        choices = "a whole number >= 1" if s.choices is NUMBER else " \\| ".join(s.choices)
        default = "64 on the CPU, 256 on a GPU" if s.default == "device" else s.default
        lines.append(f"| `{s.env}` | {choices} | {default} | {s.doc} |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Facts:
    """What a path choice depends on besides the call's shapes."""

    switches: Mapping[str, str] = field(default_factory=dict)  # switch -> value (missing: its default)
    gpu: str | None = None  # 'metal' or 'cuda' when the default device is that GPU, else None
    off: frozenset = frozenset()  # kernels switched off here (metal_kernels.switched_off)
    cpu: bool = True  # the default device is the CPU
    cuda: bool = False  # MLX's CUDA backend is present (the prefill expert path differs from Metal's)

    def __getitem__(self, env: str) -> str:
        return self.switches.get(env) or default_of(SWITCHES[env])

    def usable(self, kernel: str) -> bool:
        return kernel not in self.off


def now(gpu: str | None) -> Facts:
    """The facts of this moment: every switch's value, the given GPU backend (the caller's gpu_backend()), the
    kernels switched off."""
    import mlx.core as mx

    import metal_kernels

    return Facts(_Current(), gpu, frozenset(metal_kernels.switched_off()), mx.default_device() == mx.cpu,
                 mx.cuda.is_available())


class _Current(Mapping):
    """The switches' values now, each read when a choice asks for it (a choice reads one or two of them, and the
    ops choose at every eager call)."""

    def __getitem__(self, env: str) -> str:
        return value(env)

    def __iter__(self):
        return iter(SWITCHES)

    def __len__(self) -> int:
        return len(SWITCHES)
