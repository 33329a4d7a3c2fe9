"""A bound on what a prefill step holds in memory beyond the weights and the state.

MLX keeps a kernel's inputs allocated until the device has run it, and lets the host queue work ahead of the
device (on an H100/H200 up to 10 command batches of up to 100 kernels or 1,000 MB of inputs each) before it
waits. Between two MLA layers a prefill step has 3 KDA and 4 MoE layers of graph that the host encodes far
faster than the device runs them, so how much memory is held at once depends on how far ahead the host gets:
a whole 1M-token prefill on an H200 peaked 7.3 GB over weights + cache where one step measured alone held
1.9 GB (benchmarks/RESULTS.md). MLX's eval loop waits for the device whenever active memory exceeds
mx.set_memory_limit, so a step run under `bounded()` holds about the memory in use before it plus
KIMI_MLX_WORKING_SET_MB (default 1536; 0 leaves MLX's own limit). The limit is put back afterwards, also on
an error; it only throttles the host (MLX still allocates what a kernel needs past it).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import mlx.core as mx

from .errors import ConfigError

ENV = "KIMI_MLX_WORKING_SET_MB"
DEFAULT_MB = 1536


def bound_bytes() -> int:
    """KIMI_MLX_WORKING_SET_MB in bytes (0: no bound of ours)."""
    value = os.environ.get(ENV, "").strip() or str(DEFAULT_MB)
    if not value.isdigit():
        raise ConfigError(f"{ENV}={value!r} is not a whole number of megabytes (0 turns the bound off); "
                          "unset it or fix it")
    return int(value) << 20


@contextmanager
def bounded(extra: int | None = None):
    """Run the body with MLX's memory limit at (memory in use now + extra bytes), if that is lower than the
    limit in force; extra defaults to bound_bytes()."""
    extra = bound_bytes() if extra is None else extra
    old = mx.get_memory_limit()
    cap = mx.get_active_memory() + extra
    if not extra or cap >= old:
        yield
        return
    mx.set_memory_limit(cap)
    try:
        yield
    finally:
        mx.set_memory_limit(old)
