"""The engine (the model's one owner) without HTTP: bounded queue, cancelling waiting and running turns,
event order, forced prefixes reported as output."""

import threading
import time

import pytest

from kimi_mlx.generate import GenerationOptions
from kimi_mlx.loading import load
from kimi_mlx.server.worker import Engine, EngineSettings, Failed, Finished, Piece, Progress, QueueFull, TurnSpec


@pytest.fixture(scope="module")
def demo():
    return load("demo")


def spec(tok, text="hello", **opts):
    ids = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=True)
    return TurnSpec(ids, GenerationOptions.from_kwargs(**{"temperature": 0.0, "max_tokens": 4, **opts}))


class Sink:
    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, ev):
        self.events.append(ev)
        if isinstance(ev, (Finished, Failed)):
            self.done.set()


def test_queue_is_bounded_and_a_dropped_waiter_frees_its_place(demo):
    model, tok = demo
    engine = Engine(model, tok, EngineSettings(max_queue=2))  # not started: everything waits
    a, b = engine.submit(spec(tok), Sink()), engine.submit(spec(tok), Sink())
    with pytest.raises(QueueFull):
        engine.submit(spec(tok), Sink())
    engine.cancel(a)
    engine.cancel(a)  # twice is harmless
    assert engine.waiting == 1
    sinks = [Sink(), Sink()]
    engine.submit(spec(tok), sinks[0])
    engine.start()
    try:
        assert sinks[0].done.wait(30)
        assert engine.waiting == 0 and b.dequeued
        assert isinstance(sinks[0].events[-1], Finished)
    finally:
        engine.stop()


def test_events_in_order_and_forced_text_first(demo):
    model, tok = demo
    engine = Engine(model, tok, EngineSettings(prefill_step_size=8))
    s = spec(tok, "x" * 30)
    s.forced = tok.encode("ok: ")
    sink = Sink()
    engine.start()
    try:
        engine.submit(s, sink)
        assert sink.done.wait(30)
    finally:
        engine.stop()
    kinds = [type(e) for e in sink.events]
    first_piece = kinds.index(Piece)
    assert set(kinds[:first_piece]) == {Progress} and kinds[-1] is Finished
    progress = [e.done for e in sink.events if isinstance(e, Progress)]
    assert progress == sorted(progress) and progress[-1] == len(s.prompt) + len(s.forced) - 1
    assert sink.events[first_piece].text == "ok: " and sink.events[first_piece].token is None
    done = sink.events[-1]
    assert done.prompt_tokens == len(s.prompt) and done.completion_tokens == len(s.forced) + 4


def test_running_turn_stops_when_cancelled(demo):
    model, tok = demo
    engine = Engine(model, tok, EngineSettings(prefill_step_size=64))
    sink = Sink()
    engine.start()
    try:
        job = engine.submit(spec(tok, "long " * 4000, max_tokens=1), sink)
        deadline = time.monotonic() + 10
        while not any(isinstance(e, Progress) for e in sink.events) and time.monotonic() < deadline:
            time.sleep(0.01)
        engine.cancel(job)
        assert sink.done.wait(5)
        assert isinstance(sink.events[-1], Failed) and sink.events[-1].message == "cancelled"
        assert sum(isinstance(e, Progress) for e in sink.events) < 20000 // 64
    finally:
        engine.stop()


def test_a_process_exits_cleanly_right_after_stopping_its_engine():
    """Engine.stop waits for the engine's OS thread to end: a process that exits while the thread's C++ thread-local
    destructors still run (MLX's per-thread stream state) can abort ('terminate called without an active
    exception', exit status 134), as a server stopped with Ctrl-C did; three processes, so a race shows."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import threading
        import kimi_mlx
        from kimi_mlx.generate import GenerationOptions
        from kimi_mlx.server.worker import Engine, EngineSettings, Finished, TurnSpec
        model, tok = kimi_mlx.load("demo")
        engine = Engine(model, tok, EngineSettings(prefix_cache_bytes=0))
        ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)
        done = threading.Event()
        engine.start()
        engine.submit(TurnSpec(ids, GenerationOptions.from_kwargs(temperature=0.0, max_tokens=4)),
                      lambda ev: done.set() if isinstance(ev, Finished) else None)
        assert done.wait(60)
        engine.stop()
    """)
    for _ in range(3):
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "terminate" not in r.stderr, (r.returncode, r.stderr[-500:])
