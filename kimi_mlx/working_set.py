"""How prefill steps keep their memory: waiting for MLX's late frees.

MLX keeps a kernel's inputs allocated until the device has run it, and lets the host queue work ahead of the
device (on a CUDA card up to 10 command batches of up to MLX_MAX_OPS_PER_BUFFER kernels each) before it
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
    kernel on a worker thread, often milliseconds after the kernel ran, while a tile of attention takes far less:
    without the wait a long step holds many finished tiles; awaiting each tile whole would double the step's
    time. A limit under what the work legitimately holds times out at every new high instead, so callers give
    a slack above it (ops/attention.FREE_SLACK; RESULTS.md has the measurements)."""
    if mx.get_active_memory() <= limit:
        return limit
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < FREE_WAIT_S:
        time.sleep(5e-5)
        if mx.get_active_memory() <= limit:
            return limit
    return max(limit, mx.get_active_memory() + headroom)
