"""The working-set bound on prefill steps (kimi_mlx/working_set.py)."""

import mlx.core as mx
import pytest

from kimi_mlx import working_set
from kimi_mlx.errors import ConfigError

MB = 1 << 20


N_OPS = 120
SCALES = [mx.array(i / N_OPS) for i in range(N_OPS)]
mx.eval(SCALES)  # made before any measurement: their 8-byte buffers are not the graph's working set


def run_ahead_graph(a):
    """N_OPS expensive ops on 4 MB arrays, cheap to queue: the host gets far ahead of the device (here the CPU
    stream's worker thread), and each queued op holds its inputs and output until it has run."""
    acc = a
    for c in SCALES:
        acc = acc + mx.exp(a * c)
    return acc


def peak_of(fn):
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    fn()
    mx.synchronize()
    return mx.get_peak_memory() - base


def test_bound_holds_a_running_ahead_graph_near_the_bound():
    a = mx.random.normal((1 << 20,))
    mx.eval(a)
    free = peak_of(lambda: mx.eval(run_ahead_graph(a)))

    def bounded():
        with working_set.bounded(12 * MB):
            mx.eval(run_ahead_graph(a))

    held = peak_of(bounded)
    assert held <= 12 * MB + 3 * a.nbytes  # the bound plus what one op allocates past it
    assert free > 2 * held, (free, held)  # the graph does run ahead without the bound


def test_limit_is_set_inside_and_restored_after_also_on_error():
    before = mx.get_memory_limit()
    with working_set.bounded(5 * MB):
        assert mx.get_memory_limit() == pytest.approx(mx.get_active_memory() + 5 * MB, abs=MB)
    assert mx.get_memory_limit() == before
    with pytest.raises(RuntimeError):
        with working_set.bounded(5 * MB):
            raise RuntimeError("boom")
    assert mx.get_memory_limit() == before


def test_zero_or_a_bound_above_the_limit_leaves_the_limit(monkeypatch):
    before = mx.get_memory_limit()
    for extra in (0, before + 1):
        with working_set.bounded(extra):
            assert mx.get_memory_limit() == before
    monkeypatch.setenv(working_set.ENV, "0")
    with working_set.bounded():
        assert mx.get_memory_limit() == before


def test_env_sets_the_bound_and_a_bad_value_is_one_line(monkeypatch):
    monkeypatch.setenv(working_set.ENV, "64")
    assert working_set.bound_bytes() == 64 * MB
    monkeypatch.delenv(working_set.ENV)
    assert working_set.bound_bytes() == working_set.DEFAULT_MB * MB
    monkeypatch.setenv(working_set.ENV, "2GB")
    with pytest.raises(ConfigError, match=f"{working_set.ENV}='2GB' is not a whole number") as e:
        working_set.bound_bytes()
    assert "\n" not in str(e.value)


def test_prefill_steps_run_under_the_bound(monkeypatch):
    """generate.prefill takes its steps through prefill_step, which lowers MLX's limit while a step runs."""
    from kimi_mlx.generate import prefill

    seen = []

    class Model:
        def hidden(self, tokens, state):
            seen.append(mx.get_memory_limit())

    class State:
        offset = 0  # tokens held (generate.prefill plans its steps from it)

        def eval(self):
            pass

    before = mx.get_memory_limit()
    monkeypatch.setenv(working_set.ENV, "7")
    prefill(Model(), State(), list(range(10)), 4)
    assert len(seen) == 3 and all(s == pytest.approx(mx.get_active_memory() + 7 * MB, abs=MB) for s in seen)
    assert mx.get_memory_limit() == before


def test_describe_names_the_cap_and_the_tile_wait(monkeypatch):
    from kimi_mlx.ops import attention

    monkeypatch.setattr(attention, "FREE_SLACK", None)
    monkeypatch.delenv(working_set.ENV, raising=False)
    assert "no cap" in working_set.describe() and "tiles wait" not in working_set.describe()
    assert "run one layer at a time" in working_set.describe()
    monkeypatch.setattr(attention, "FREE_SLACK", 2048 << 20)
    monkeypatch.setenv(working_set.ENV, "1536")
    line = working_set.describe()
    assert "tiles wait for freed memory past 2048 MB" in line and "capped at 1536 MB" in line


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
