"""How prefill steps keep their memory: waiting for MLX's late frees, and the line that describes it.

MLX keeps a kernel's inputs allocated until the device has run it, and lets the host queue work ahead of the
device (on an H100/H200 up to 10 command batches of up to 100 kernels or 1,000 MB of inputs each) before it
waits. The decoder paces long prefill steps layer by layer (model/decoder.py, Model._layers), which bounds how
far the host gets ahead. MLX also frees a finished kernel's buffers on a worker thread, often milliseconds after
the device ran it, so a host queueing short kernels holds many finished ones: `await_frees` waits for those
frees past a slack (the attention tile loop, ops/attention.py).
"""

from __future__ import annotations

import time

import mlx.core as mx

FREE_WAIT_S = 0.02  # the longest one await_frees waits; past it the limit rises to what is in use (+ headroom)


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
