"""How prefill steps keep their memory: the wait for late frees (kimi_mlx/working_set.py), the line describing
it (model/decoder.prefill_memory)."""

import mlx.core as mx

from kimi_mlx import working_set
from kimi_mlx.model.decoder import prefill_memory


def test_describe_names_the_pacing_and_the_tile_wait(monkeypatch):
    from kimi_mlx.ops import attention

    monkeypatch.setattr(attention, "FREE_SLACK", None)
    assert "tiles wait" not in prefill_memory()
    assert "run one layer at a time" in prefill_memory()
    monkeypatch.setattr(attention, "FREE_SLACK", 2048 << 20)
    assert "tiles wait for freed memory past 2048 MB" in prefill_memory()


def test_await_frees_waits_for_memory_to_be_released_and_gives_up_once():
    """await_frees returns at once under the limit, waits while memory a worker is about to free is still held
    (here a thread drops an array 30 ms later), and past FREE_WAIT_S raises the limit to what is in use (plus a headroom)."""
    import threading
    import time

    held = [mx.ones((1 << 22,)) + 0]  # 16 MB
    mx.eval(held)
    now = mx.get_active_memory()
    t0 = time.perf_counter()
    assert working_set.await_frees(now) == now and working_set.await_frees(now + 10) == now + 10
    assert time.perf_counter() - t0 < working_set.FREE_WAIT_S  # under the limit: no wait
    t0 = time.perf_counter()
    assert working_set.await_frees(now - 1) == now  # nothing freed: gives up after FREE_WAIT_S, limit raised to the use
    assert working_set.await_frees(now - 1, 1 << 20) == now + (1 << 20)  # ... plus the headroom asked for
    assert working_set.FREE_WAIT_S <= time.perf_counter() - t0 < 1.0
    threading.Timer(0.03, held.clear).start()
    limit = now - (8 << 20)
    t0 = time.perf_counter()
    old, working_set.FREE_WAIT_S = working_set.FREE_WAIT_S, 5.0
    try:
        assert working_set.await_frees(limit) == limit  # returned once the array was dropped, not after 5 s
    finally:
        working_set.FREE_WAIT_S = old
    assert 0.02 < time.perf_counter() - t0 < 2.0 and mx.get_active_memory() <= limit
