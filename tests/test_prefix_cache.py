"""Prefix-state cache: lookup, LRU under a byte budget with shared buffers, and exactness of restored states
(restore + feed the suffix == a fresh prefill), at the cache, model and engine level."""

import mlx.core as mx
import numpy as np
import pytest

from kimi_mlx.feed import prefill

from kimi_mlx.generate import GenerationOptions
from kimi_mlx.loading import load
from kimi_mlx.server import prefix_cache as pc
from kimi_mlx.server.prefix_cache import PrefixCache, state_buffers
from kimi_mlx.server.worker import Engine, EngineSettings, Failed, Finished, Job, Piece, Progress, TurnSpec


@pytest.fixture(scope="module")
def demo():
    return load("demo")


def feed(model, tokens, state=None):
    state = state or model.new_state(1)
    prefill(model, state, list(tokens), 64)
    return state


def last_logprobs(model, tokens, state=None):
    """Log-probabilities after `tokens` fed on top of `state` (a fresh state if None)."""
    state = state or model.new_state(1)
    logits = model(mx.array([list(tokens)]), state)[0, -1].astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits))


def test_prefix_hashes_identify_prefixes():
    a = pc.prefix_hashes([5, 6, 7])
    b = pc.prefix_hashes([5, 6, 8, 9])
    assert len(a) == 4 and a[0] == 0
    assert a[2] == b[2] and a[3] != b[3]
    assert pc.prefix_hashes([0])[1] != pc.prefix_hashes([1])[1]


def test_lookup_returns_longest_stored_prefix(demo):
    model, _ = demo
    cache = PrefixCache(1 << 30)
    toks = list(range(1, 60))
    for n in (10, 30, 50):
        cache.insert(toks[:n], feed(model, toks[:n]))
    assert cache.lookup(toks)[0] == 50
    assert cache.lookup(toks, max_len=49)[0] == 30
    assert cache.lookup(toks[:30] + [99, 98])[0] == 30
    assert cache.lookup([99] + toks)[0] == 0
    n, state = cache.lookup(toks[:40])
    assert n == 30 and state.offset == 30


def test_hash_collision_is_a_miss_never_a_wrong_state(demo, monkeypatch):
    model, _ = demo
    monkeypatch.setattr(pc, "prefix_hashes", lambda t: np.zeros(len(t) + 1, np.uint64))
    cache = PrefixCache(1 << 30)
    cache.insert([1, 2, 3], feed(model, [1, 2, 3]))
    assert cache.lookup([1, 2, 3, 4])[0] == 3
    assert cache.lookup([1, 2, 9, 4]) == (0, None)


def test_lru_eviction_keeps_bytes_under_budget(demo):
    model, _ = demo
    one = sum(b.nbytes for b in state_buffers(feed(model, [1, 2, 3])))
    cache = PrefixCache(int(2.5 * one))
    for first in (1, 2, 3):  # three unrelated prompts, the same size
        cache.insert([first, 2, 3], feed(model, [first, 2, 3]))
    stats = cache.stats()
    assert stats.entries == 2 and stats.bytes <= stats.max_bytes
    assert cache.lookup([1, 2, 3, 4])[0] == 0  # the least recently used went first
    assert cache.lookup([3, 2, 3, 4])[0] == 3
    cache.insert([4, 2, 3], feed(model, [4, 2, 3]))
    assert cache.lookup([3, 2, 3, 4])[0] == 3  # touched by the lookup, so [2, ...] was evicted instead
    assert cache.lookup([2, 2, 3, 4])[0] == 0
    assert PrefixCache(0).insert([1], feed(model, [1])) is False


def test_shared_buffers_are_counted_once(demo):
    model, _ = demo
    cache = PrefixCache(1 << 30)
    state = feed(model, range(1, 40))
    cache.insert(list(range(1, 40)), state)
    cache.insert(list(range(1, 40)), state)  # the same key again: no new bytes
    single = cache.stats().bytes
    twin = state.snapshot()  # shares every buffer with `state`
    cache.insert(list(range(1, 40)) + [7], twin)  # a different key holding the same arrays
    assert cache.stats().bytes == single
    cache.clear()
    assert cache.stats().bytes == 0 and cache.stats().entries == 0


def test_restored_snapshot_equals_fresh_prefill(demo):
    """A snapshot kept while the live state went on (and was branched) restores exactly."""
    model, _ = demo
    rng = np.random.default_rng(0)
    history = rng.integers(0, 256, 300).tolist()
    suffix = rng.integers(0, 256, 40).tolist()
    cache = PrefixCache(1 << 30)
    live = feed(model, history)
    cache.insert(history, live)
    feed(model, rng.integers(0, 256, 500).tolist(), live)  # the live state moves on past the snapshot
    n, restored = cache.lookup(history + suffix)
    assert n == len(history)
    got = last_logprobs(model, suffix, restored)
    want = last_logprobs(model, history + suffix)
    np.testing.assert_allclose(got, want, atol=2e-4)
    assert int(np.argmax(got)) == int(np.argmax(want))
    n, again = cache.lookup(history + suffix)  # the first restore did not change the stored entry
    np.testing.assert_allclose(last_logprobs(model, suffix, again), got, atol=1e-6)


class Sink:
    def __init__(self):
        self.events = []

    def __call__(self, ev):
        self.events.append(ev)

    def done(self) -> Finished:
        assert not any(isinstance(e, Failed) for e in self.events), self.events
        return next(e for e in self.events if isinstance(e, Finished))

    def pieces(self):
        return [e for e in self.events if isinstance(e, Piece)]


def run(engine, prompt, **opts):
    sink = Sink()
    options = GenerationOptions.from_kwargs(**{"temperature": 0.0, "max_tokens": 4, **opts})
    engine.run_turn(Job(TurnSpec(prompt, options), sink))
    return sink


def test_engine_growing_conversation_reuses_state(demo):
    model, tok = demo
    engine = Engine(model, tok, EngineSettings(prefix_cache_bytes=1 << 30, snapshot_interval=64,
                                               prefill_step_size=32))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there " * 12}]
    turn1 = tok.apply_chat_template(messages, tokenize=True)
    first = run(engine, turn1)
    assert first.done().cached_tokens == 0
    assert [e.done for e in first.events if isinstance(e, Progress)][-1] == len(turn1) - 1
    reply = [p.token for p in first.pieces()]
    messages += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "and now?"}]
    turn2 = tok.apply_chat_template(messages, tokenize=True)
    second = run(engine, turn2, logprobs=True, top_logprobs=5, max_tokens=1)
    done = second.done()
    # the reply's text differs from what was generated, so the reuse stops at the last message end before it
    boundary = max(i + 1 for i, t in enumerate(turn1) if t == tok.im_end_id)
    assert done.cached_tokens >= boundary and done.prompt_tokens == len(turn2)
    want = last_logprobs(model, turn2)
    for token, lp in second.pieces()[0].top_logprobs:
        assert abs(lp - want[token]) < 2e-4
    assert second.pieces()[0].token == int(np.argmax(want))
    # resending turn 1 plus exactly the generated ids hits the snapshot taken after the reply
    grown = turn1 + reply + tok.encode("more")
    third = run(engine, grown, logprobs=True, top_logprobs=3, max_tokens=1)
    expected = len(turn1) + len(reply) - 1  # a row's final state holds all but its last token
    assert third.done().cached_tokens == expected
    want = last_logprobs(model, grown)
    for token, lp in third.pieces()[0].top_logprobs:
        assert abs(lp - want[token]) < 2e-4


def test_prefill_plan_cuts_at_message_ends_and_intervals(demo):
    model, tok = demo
    engine = Engine(model, tok, EngineSettings(snapshot_interval=10, prefill_step_size=4))
    end = tok.im_end_id
    seq = [1, 2, end, 3, 4, 5, 6, 7, 8, 9, 10, 11, end, 12, 13]
    plan = engine.prefill_plan(seq, 0)
    assert [p for p, keep in plan if keep] == [3, 10, 13]
    assert plan[-1][0] == len(seq) - 1 and all(b - a <= 4 for (a, _), (b, _) in zip([(0, 0)] + plan, plan))
    assert engine.prefill_plan(seq, 11) == [(13, True), (14, False)]
    assert engine.prefill_plan(seq, 14) == []
    off = Engine(model, tok, EngineSettings(prefix_cache_bytes=0, snapshot_interval=10, prefill_step_size=4))
    assert off.prefill_plan(seq, 0) == [(4, False), (8, False), (12, False), (14, False)]  # no snapshots to cut for
