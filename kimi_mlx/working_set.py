"""An optional bound on what a prefill step holds in memory beyond the weights and the state (off by default).

MLX keeps a kernel's inputs allocated until the device has run it, and lets the host queue work ahead of the
device (on an H100/H200 up to 10 command batches of up to 100 kernels or 1,000 MB of inputs each) before it
waits. MLX's eval loop also waits for the device whenever active memory exceeds mx.set_memory_limit, so a step
run under `bounded()` with KIMI_MLX_WORKING_SET_MB set holds about the memory in use before it plus that many
MB (one kernel's allocation may pass it). The limit is put back afterwards, also on an error.

Off by default (0): on an H200 it held single 2,048-token steps at 262k and 852k context to 1.9 GB (2.34
without it), yet a whole 1M-token prefill run with it at 1,536 MB peaked 96.7 GB over weights + cache against
7.3 GB without it (benchmarks/RESULTS.md). The decoder paces long prefill steps layer by layer instead
(model/decoder.py, Model._layers), which bounds how far the host gets ahead without touching MLX's limit.

What a long step still held beyond that was found later: MLX frees a finished kernel's buffers on a worker
thread, often milliseconds after the device ran it, so a host queueing short kernels holds many finished ones.
`await_frees` waits for those frees past a slack (the attention tile loop, ops/attention.py), and paced steps
await each layer before queuing the next (model/decoder.py, Model._layers).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import mlx.core as mx

from .errors import ConfigError

ENV = "KIMI_MLX_WORKING_SET_MB"
DEFAULT_MB = 0
FREE_WAIT_S = 0.02  # the longest one await_frees waits; past it the limit rises to what is in use (+ headroom)


def bound_bytes() -> int:
    """KIMI_MLX_WORKING_SET_MB in bytes (0, the default: no bound of ours)."""
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


def await_frees(limit: int, headroom: int = 0) -> int:
    """Wait until the memory in use is at most limit, or FREE_WAIT_S has passed; returns the limit to use next
    (if the wait ran out: what is in use plus headroom, so memory held for other reasons costs one wait, not
    one per call, nor one per new high of a usage that merely fluctuates). MLX frees the buffers of a finished
    kernel on a worker thread, on an H200 often milliseconds after the kernel ran, while a tile takes ~0.4 ms
    at 700k keys: consecutive 2,048-token steps there held 3.7-7.9 GB (2.34 GB when each tile was awaited whole,
    at twice the time; 2.3-2.8 GB with this wait at 2.5 GB over the step's start, 13 waits in 10 steps, at the
    unthrottled step time; RESULTS.md). A limit under what the work legitimately holds times out at every new
    high instead: 512 MB over an MLA call's start doubled the step time at 262k-393k keys (RESULTS.md)."""
    if mx.get_active_memory() <= limit:
        return limit
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < FREE_WAIT_S:
        time.sleep(5e-5)
        if mx.get_active_memory() <= limit:
            return limit
    return max(limit, mx.get_active_memory() + headroom)


def describe() -> str:
    """One line on how prefill steps keep their memory (doctor and bench print it)."""
    from .model.decoder import PACED_PREFILL
    from .ops.attention import FREE_SLACK

    mb = bound_bytes() >> 20
    cap = f"capped at {mb} MB past the weights and state" if mb else "no cap"
    tiles = f"; attention tiles wait for freed memory past {FREE_SLACK >> 20} MB" if FREE_SLACK is not None else ""
    return f"steps of {PACED_PREFILL}+ tokens run one layer at a time on a GPU{tiles}; {cap} ({ENV})"
