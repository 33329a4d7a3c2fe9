"""Continuous batching in the server: the engine (without HTTP) runs concurrent turns as rows of one batch, each
turn's reply equal to the same turn alone; a turn cancelled mid-reply leaves while the others go on; a prefix-cache
hit joins a running batch; the memory bound holds turns back. Over HTTP: n choices (one prefill, usage counting the
prompt once, seeded choices reproducible), streaming with choice indexes, n = 0 / n over --max-batch as 400s,
/health's running and queued counts, streams preempted under --batch-memory replying as alone."""

import asyncio
import json
import threading
import time

import httpx
import mlx.core as mx
import pytest

from kimi_mlx.generate import GenerationOptions
from kimi_mlx.loading import load
from kimi_mlx.server.worker import Engine, EngineSettings, Failed, Finished, Job, Piece, TurnSpec

from test_server import no_stop_bias, start_server, stop_server, user

openai = pytest.importorskip("openai")
LOGPROB_TOL = 1e-3 if mx.default_device() == mx.gpu else 1e-4  # CPU float32: the batch engine's rows match closely


@pytest.fixture(scope="module")
def demo():
    return load("demo")


class Sink:
    """Collects a turn's events; notes how many rows the engine was running when each piece came."""

    def __init__(self, engine=None, n=1):
        self.engine, self.n = engine, n
        self.events, self.done, self.rows_seen = [], threading.Event(), []

    def __call__(self, ev):
        self.events.append(ev)
        if self.engine is not None and isinstance(ev, Piece):
            self.rows_seen.append(self.engine.batch.running)
        if isinstance(ev, Failed) or sum(isinstance(e, Finished) for e in self.events) == self.n:
            self.done.set()

    def tokens(self, index=0):
        return [e.token for e in self.events if isinstance(e, Piece) and e.index == index]

    def logprobs(self, index=0):
        return [e.logprob for e in self.events if isinstance(e, Piece) and e.index == index]

    def finished(self, index=0) -> Finished:
        assert not any(isinstance(e, Failed) for e in self.events), self.events
        return next(e for e in self.events if isinstance(e, Finished) and e.index == index)


def chat_ids(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)


def turn(tok, text, **opts):
    options = GenerationOptions.from_kwargs(**{"temperature": 0.0, "max_tokens": 8, "logprobs": True, **opts})
    return TurnSpec(chat_ids(tok, text), options)


def alone(demo, spec: TurnSpec) -> Sink:
    """The turn served by itself (a fresh engine, no prefix cache)."""
    model, tok = demo
    sink = Sink(n=spec.n)
    Engine(model, tok, EngineSettings(prefix_cache_bytes=0)).run_turn(Job(spec, sink))
    return sink


def run_together(engine, specs, timeout=120, each=None) -> list[Sink]:
    """specs submitted at once to the engine's thread; each(i, event), if given, sees turn i's events in the order
    the engine sends them."""
    sinks = [Sink(engine, s.n) for s in specs]
    engine.start()
    try:
        for i, (s, sink) in enumerate(zip(specs, sinks)):
            engine.submit(s, sink if each is None else (lambda ev, i=i, sink=sink: (each(i, ev), sink(ev))))
        for sink in sinks:
            assert sink.done.wait(timeout)
    finally:
        engine.stop()
    return sinks


def test_eight_concurrent_turns_each_equal_the_turn_alone(demo):
    model, tok = demo
    ban = {tok.im_end_id: -100.0, tok.eos_id: -100.0}
    long = dict(max_tokens=16, logit_bias=ban)  # replies that overlap the other turns' prefill and decode
    specs = [turn(tok, "hi", **long),
             turn(tok, "tell me a long story about a fox " * 6, **long),
             turn(tok, "what is 2 + 2?", temperature=0.9, seed=3, **long),
             turn(tok, "list three colours " * 3, top_logprobs=3, **long),
             turn(tok, "x", stop=["e"], max_tokens=16),
             turn(tok, "write json", temperature=0.7, top_p=0.9, seed=11, repetition_penalty=1.3, **long),
             turn(tok, "a b c d e f g " * 10, presence_penalty=0.5, frequency_penalty=0.5, **long),
             turn(tok, "one more", max_tokens=3)]
    specs[3].banned = [tok.encode(" the")[0]]
    engine = Engine(model, tok, EngineSettings(prefix_cache_bytes=0, prefill_step_size=16))
    together = run_together(engine, specs)
    assert max(max(s.rows_seen) for s in together) >= 4  # the turns really shared the batch
    for spec, got in zip(specs, together):
        want = alone(demo, spec)
        assert got.tokens() == want.tokens()
        assert "".join(e.text for e in got.events if isinstance(e, Piece)) == \
            "".join(e.text for e in want.events if isinstance(e, Piece))
        for a, b in zip(got.logprobs(), want.logprobs()):
            assert abs(a - b) < LOGPROB_TOL
        g, w = got.finished(), want.finished()
        assert (g.finish_reason, g.completion_tokens, g.generated) == (w.finish_reason, w.completion_tokens,
                                                                       w.generated)


def run_beside(engine, runner, later, sinks, timeout=60) -> None:
    """Start `runner`; once it has yielded a token, submit `later` beside it; wait for both (sinks: theirs)."""
    engine.start()
    try:
        engine.submit(runner, sinks[0])
        deadline = time.monotonic() + timeout
        while not sinks[0].tokens() and time.monotonic() < deadline:
            time.sleep(0.005)
        engine.submit(later, sinks[1])
        for s in sinks:
            assert s.done.wait(timeout)
    finally:
        engine.stop()


def test_a_cancelled_turn_leaves_while_the_others_go_on(demo):
    model, tok = demo
    ban = {tok.im_end_id: -100.0, tok.eos_id: -100.0}
    specs = [turn(tok, f"story {i}", max_tokens=24, logit_bias=ban) for i in range(3)]
    engine = Engine(model, tok, EngineSettings(prefix_cache_bytes=0))
    sinks = [Sink(engine) for _ in specs]
    engine.start()
    try:
        jobs = [engine.submit(s, sink) for s, sink in zip(specs, sinks)]
        deadline = time.monotonic() + 60
        while len(sinks[1].tokens()) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        engine.cancel(jobs[1])
        for sink in sinks:
            assert sink.done.wait(60)
    finally:
        engine.stop()
    assert isinstance(sinks[1].events[-1], Failed) and sinks[1].events[-1].message == "cancelled"
    assert len(sinks[1].tokens()) < 24
    for i in (0, 2):
        assert sinks[i].finished().completion_tokens == 24
        assert sinks[i].tokens() == alone(demo, specs[i]).tokens()
    assert engine.batch.running == 0


def test_a_prefix_cache_hit_joins_a_running_batch(demo):
    model, tok = demo
    engine = Engine(model, tok, EngineSettings(prefill_step_size=16))
    first = turn(tok, "remember this: " + "blue " * 30)
    sink = Sink()
    engine.run_turn(Job(first, sink))
    reply = sink.finished().generated
    # a long reply keeps the batch busy while the follow-up (the first turn + its reply + more) joins it
    runner = turn(tok, "count slowly", max_tokens=40, logit_bias={tok.im_end_id: -100.0, tok.eos_id: -100.0})
    follow = TurnSpec(first.prompt + reply + tok.encode(" and again?"), first.options)
    sinks = [Sink(engine), Sink(engine)]
    run_beside(engine, runner, follow, sinks)
    done = sinks[1].finished()
    assert done.cached_tokens == len(first.prompt) + len(reply) - 1  # the reply's state, all but its last token
    assert sinks[1].rows_seen[0] == 2 and len(sinks[0].tokens()) == 40  # it joined beside the runner
    want = alone(demo, follow)  # no cache: prefilled from the start
    assert sinks[1].tokens() == want.tokens()
    for a, b in zip(sinks[1].logprobs(), want.logprobs()):
        assert abs(a - b) < LOGPROB_TOL


def test_n_rows_share_one_prefill_and_seeded_rows_reproduce(demo):
    model, tok = demo
    spec = turn(tok, "pick a word", temperature=1.0, seed=5, max_tokens=6)
    spec.n = 3
    engine = Engine(model, tok, EngineSettings(prefix_cache_bytes=0, prefill_step_size=4))
    sink = Sink(n=3)
    engine.run_turn(Job(spec, sink))
    progress = [e for e in sink.events if type(e).__name__ == "Progress"]
    done = [e.done for e in progress]  # the prompt is fed once for the three rows
    assert done == sorted(set(done)) and done[-1] == len(spec.prompt) - 1
    rows = [sink.tokens(j) for j in range(3)]
    assert len({tuple(r) for r in rows}) > 1  # each row samples on its own
    for j in range(3):  # row j is the one-choice turn with seed + j
        single = turn(tok, "pick a word", temperature=1.0, seed=5 + j, max_tokens=6)
        assert rows[j] == alone(demo, single).tokens()
        assert sink.finished(j).prompt_tokens == len(spec.prompt)


def test_memory_bound_holds_turns_back(demo):
    model, tok = demo
    engine = Engine(model, tok, EngineSettings(prefix_cache_bytes=0))
    longest = len(chat_ids(tok, "a")) + 8
    # room for one running row and one more being prefilled, not for two rows in the batch
    engine.batch_memory = engine.state_size.batch(1, longest) + engine.state_size.single(longest)
    assert engine.state_size.batch(2, longest) + engine.state_size.single(longest) > engine.batch_memory
    ban = {tok.im_end_id: -100.0, tok.eos_id: -100.0}
    specs = [turn(tok, c, logit_bias=ban) for c in "abc"]
    sinks = run_together(engine, specs)
    assert max(max(s.rows_seen) for s in sinks) == 1
    assert all(s.finished().completion_tokens == 8 for s in sinks)


def test_state_size_bounds_the_real_state(demo):
    model, tok = demo
    engine = Engine(model, tok, EngineSettings(prefix_cache_bytes=0))
    state = model.new_state(1)
    model(mx.array([[5] * 300]), state)
    size = engine.state_size
    assert state.nbytes <= size.single(300) < size.single(3000) < size.single(30000)
    assert size.batch(1, 300) >= size.single(300) and size.batch(3, 300) == size.batch(4, 300) == 4 * size.batch(1, 300)
    assert size.batch(8, 300) == size.batch(20, 300)  # no more slots than --max-batch


def test_state_size_bounds_the_batched_state(demo):
    """The memory bound's estimate of a full batch holds what the batch engine really takes (peak, activations
    of its steps included), so the bound tracks the batched state's layout."""
    from kimi_mlx.batch import BatchGenerator
    from kimi_mlx.feed import prefill

    model, tok = demo
    size = Engine(model, tok, EngineSettings(prefix_cache_bytes=0)).state_size
    batch = BatchGenerator(model, tok, max_batch=8)
    state = model.new_state(1)
    prefill(model, state, [5] * 300)
    mx.eval(state.arrays())
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    opts = GenerationOptions.from_kwargs(max_tokens=40, temperature=0, logit_bias={tok.im_end_id: -100.0})
    batch.insert(state, 5, opts, n=8)
    for _ in range(40):
        batch.step()
    mx.synchronize()
    assert 0 < mx.get_peak_memory() - base <= size.batch(8, 341)


# -- over HTTP ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("server"), "--max-batch", "3", "--prefill-step-size", "64")
    yield s
    stop_server(s)


def test_n_choices_whole_and_streamed(server):
    c = server.client()
    kw = dict(model="demo", messages=user("name a fruit"), max_tokens=6, temperature=1.0, seed=7)
    r = c.chat.completions.create(n=3, **kw)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    single = [c.chat.completions.create(**{**kw, "seed": 7 + j}) for j in range(3)]
    assert [ch.message.content for ch in r.choices] == [s.choices[0].message.content for s in single]
    assert r.usage.prompt_tokens == single[0].usage.prompt_tokens  # the prompt counted once
    assert r.usage.completion_tokens == sum(s.usage.completion_tokens for s in single)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = c.chat.completions.create(n=3, **kw)
    assert [ch.message.content for ch in again.choices] == [ch.message.content for ch in r.choices]

    texts, finishes, usage = {}, {}, None
    for chunk in c.chat.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
            finishes[ch.index] = ch.finish_reason or finishes.get(ch.index)
    assert [texts[j] for j in range(3)] == [ch.message.content for ch in r.choices]
    assert [finishes[j] for j in range(3)] == [ch.finish_reason for ch in r.choices]
    assert (usage.prompt_tokens, usage.completion_tokens) == (r.usage.prompt_tokens, r.usage.completion_tokens)

    comp = c.completions.create(model="demo", prompt="Once upon", max_tokens=4, n=2, temperature=0, logprobs=2)
    assert [ch.index for ch in comp.choices] == [0, 1] and comp.choices[0].text == comp.choices[1].text
    assert comp.usage.completion_tokens == 8 and comp.choices[1].logprobs.tokens


def test_bad_n_is_a_400_naming_it(server):
    for n, word in ((0, "1 to 3"), (4, "--max-batch"), ("three", None)):
        r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                       json={"messages": user("hi"), "max_tokens": 2, "n": n})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "n" and err["type"] == "invalid_request_error"
        assert word is None or word in err["message"]
    r = httpx.post(server.url + "/v1/responses", timeout=30, json={"input": "hi", "n": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_health_counts_running_and_queued_rows(server):
    body = {"model": "demo", "max_tokens": 4000, "stream": True, "logit_bias": no_stop_bias()}

    async def main():
        async with httpx.AsyncClient(timeout=60) as http:
            async def hold(i, ready):
                async with http.stream("POST", server.url + "/v1/chat/completions",
                                       json={**body, "messages": user(f"go {i}"), "n": 2 if i == 0 else 1}) as resp:
                    async for line in resp.aiter_lines():
                        if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                            ready.set()  # a token came: its rows are in the batch
                            await asyncio.sleep(60)  # hold the stream open until cancelled

            events = [asyncio.Event() for _ in range(3)]
            tasks = []
            for i in range(2):  # in turn: n=2 first, then one more row: 3 rows fill --max-batch 3
                tasks.append(asyncio.ensure_future(hold(i, events[i])))
                await asyncio.wait_for(events[i].wait(), 60)
            tasks.append(asyncio.ensure_future(hold(2, events[2])))  # no row for it: it waits
            deadline = time.monotonic() + 10
            while True:
                health = (await http.get(server.url + "/health")).json()
                if health["queued"] == 1 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return health

    health = asyncio.run(main())
    assert health["running"] == 3 and health["queued"] == 1 and health["busy"] and health["max_batch"] == 3
    assert server.wait_idle(10) < 10
    idle = server.health()
    assert (idle["running"], idle["queued"], idle["prefilling"], idle["paused"]) == (0, 0, 0, 0)


def test_concurrent_http_requests_equal_alone(server):
    prompts = [f"request {i}: " + "tell me something " * i for i in range(6)]

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        try:
            async def one(i, p):
                if i % 2:
                    r = await client.completions.create(model="demo", prompt=p, max_tokens=5, temperature=0)
                    return r.choices[0].text
                r = await client.chat.completions.create(model="demo", messages=user(p), max_tokens=5, temperature=0)
                return r.choices[0].message.content
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        finally:
            await client.close()

    together = asyncio.run(main())
    c = server.client()
    for i, (p, got) in enumerate(zip(prompts, together)):
        if i % 2:
            want = c.completions.create(model="demo", prompt=p, max_tokens=5, temperature=0).choices[0].text
        else:
            want = c.chat.completions.create(model="demo", messages=user(p), max_tokens=5,
                                             temperature=0).choices[0].message.content
        assert got == want
    assert json.dumps(server.health())  # still answering


def test_a_fault_in_a_step_fails_its_turns_and_the_engine_goes_on(demo, monkeypatch):
    from kimi_mlx.batch import BatchGenerator

    model, tok = demo
    engine = Engine(model, tok, EngineSettings(prefix_cache_bytes=0))
    step, calls = BatchGenerator.step, []

    def once_broken(self):
        calls.append(self)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return step(self)

    monkeypatch.setattr(BatchGenerator, "step", once_broken)
    sinks = run_together(engine, [turn(tok, "a"), turn(tok, "b")])
    failed = [s.events[-1] for s in sinks if isinstance(s.events[-1], Failed)]
    assert failed and all(not f.client_error and "boom" in f.message for f in failed)  # the rows in that batch
    assert engine.batch is not calls[0] and engine.batch.running == 0
    sink = run_together(engine, [turn(tok, "c")])[0]  # (a restarted engine thread, too)
    assert sink.finished().completion_tokens >= 1


def test_closing_one_stream_leaves_the_other_replies_whole(server):
    body = {"model": "demo", "max_tokens": 30, "temperature": 0, "stream": True, "logit_bias": no_stop_bias()}

    async def main():
        async with httpx.AsyncClient(timeout=60) as http:
            async def read(i, stop_after=None):
                text, finish, seen = "", None, 0
                async with http.stream("POST", server.url + "/v1/chat/completions",
                                       json={**body, "messages": user(f"story {i}")}) as resp:
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        choice = json.loads(line[6:])["choices"][0]
                        text += choice["delta"].get("content") or ""
                        finish = choice["finish_reason"] or finish
                        seen += 1
                        if stop_after and seen >= stop_after:
                            return text, "closed"  # leaving the block closes the connection
                return text, finish

            return await asyncio.gather(read(0, stop_after=4), read(1))

    (_, closed), (text, finish) = asyncio.run(main())
    assert closed == "closed" and finish == "length"
    want = server.client().chat.completions.create(model="demo", messages=user("story 1"), max_tokens=30,
                                                   temperature=0, logit_bias=no_stop_bias())
    assert text == want.choices[0].message.content
    assert server.wait_idle(10) < 10


def test_a_long_prompt_is_fed_a_step_a_round_between_the_rows_decode_steps(demo):
    model, tok = demo
    engine = Engine(model, tok, EngineSettings(prefix_cache_bytes=0, prefill_step_size=16))
    log = []  # (who, event) in the engine thread's order

    class Logged(Sink):
        def __init__(self, name):
            super().__init__(engine)
            self.name = name

        def __call__(self, ev):
            log.append((self.name, type(ev).__name__))
            super().__call__(ev)

    runner = turn(tok, "go", max_tokens=60, logit_bias={tok.im_end_id: -100.0, tok.eos_id: -100.0})
    long = turn(tok, "word " * 60)
    sinks = [Logged("runner"), Logged("long")]
    run_beside(engine, runner, long, sinks)
    steps = [i for i, (who, kind) in enumerate(log) if who == "long" and kind == "Progress"]
    assert len(steps) == -(-(len(long.prompt) - 1) // 16) > 3
    for a, b in zip(steps, steps[1:]):  # one prefill step a round, a decode step of the runner between
        assert ("runner", "Piece") in log[a:b]
    assert sinks[1].tokens() == alone(demo, long).tokens()


def test_a_burst_of_short_prompts_joins_in_one_round(demo):
    model, tok = demo
    engine = Engine(model, tok, EngineSettings(prefix_cache_bytes=0))
    specs = [turn(tok, f"short {i}") for i in range(8)]
    sinks = [Sink(engine) for _ in specs]
    for s, sink in zip(specs, sinks):  # all queued before the engine thread starts
        engine.submit(s, sink)
    engine.start()
    try:
        for sink in sinks:
            assert sink.done.wait(60)
    finally:
        engine.stop()
    assert all(s.rows_seen[0] == 8 for s in sinks)  # every first token came from a step of all eight rows


# -- preemption: optimistic admission, a turn paused when the batch outgrows batch_memory ----------------------


def drive(engine, specs, each_round=None) -> list[Sink]:
    """The engine's rounds on this thread (deterministic), until every turn ended; each_round(jobs) after each."""
    engine._new_batch()
    sinks = [Sink(engine, s.n) for s in specs]
    jobs = [engine.submit(s, k) for s, k in zip(specs, sinks)]
    while not all(k.done.is_set() for k in sinks):
        engine._take()
        engine._iterate()
        if each_round:
            each_round(jobs)
    return sinks


def preempting(demo):
    """Three turns without max_tokens (the server's --max-tokens cap of 40 replies for them) whose prompts end just
    short of the first MLA page (256 rows): batch_memory fits the three rows admitted together with a 16-token
    horizon (a page each, four slots) and their prompts' prefill, not the three past 256 tokens (a page of 512)."""
    model, tok = demo
    engine = Engine(model, tok, EngineSettings(prefix_cache_bytes=0, max_tokens=40))
    engine.horizon = 16
    ban = {tok.im_end_id: -100.0, tok.eos_id: -100.0}
    specs = []
    for target, extra in ((232, {}), (238, {}), (226, dict(temperature=0.9, seed=4, repetition_penalty=1.3))):
        words = 1
        while len(chat_ids(tok, "go " * (words + 1))) <= target:
            words += 1
        ids = chat_ids(tok, "go " * words)
        limit = model.config.max_position_embeddings
        opts = {"temperature": 0.0, "logprobs": True, "logit_bias": ban, **extra}
        opts["max_tokens"] = min(engine.settings.max_tokens or limit, limit - len(ids))  # as requests.options
        specs.append(TurnSpec(ids, GenerationOptions.from_kwargs(**opts)))
    size = engine.state_size
    engine.batch_memory = size.batch(3, 256) + size.single(240)
    assert all(256 < s.prompt.__len__() + s.options.max_tokens <= 512 for s in specs)
    assert size.batch(3, 257) > engine.batch_memory  # the three cannot all grow past the page together
    assert size.batch(3, 280) + size.single(240) > engine.batch_memory  # nor be admitted at their longest
    return engine, specs


_ALONE: dict = {}


def alone_once(demo, spec: TurnSpec) -> Sink:
    """alone(), once per prompt and options (the preemption tests share their turns)."""
    key = (tuple(spec.prompt), repr(spec.options))
    if key not in _ALONE:
        _ALONE[key] = alone(demo, spec)
    return _ALONE[key]


def test_turns_without_max_tokens_batch_and_a_preempted_one_replies_as_alone(demo):
    engine, specs = preempting(demo)
    paused_rows = []
    sinks = drive(engine, specs, lambda jobs: paused_rows.append(engine.rows_paused))
    assert max(max(s.rows_seen) for s in sinks) == 3  # admitted together (at their worst case they would not be)
    assert engine.preemptions >= 1 and max(paused_rows) >= 1 and engine.rows_paused == 0
    for spec, got in zip(specs, sinks):
        want = alone_once(demo, spec)
        assert got.tokens() == want.tokens() and len(got.tokens()) == 40
        assert "".join(e.text for e in got.events if isinstance(e, Piece)) == \
            "".join(e.text for e in want.events if isinstance(e, Piece))
        for a, b in zip(got.logprobs(), want.logprobs()):
            assert abs(a - b) < LOGPROB_TOL
        g, w = got.finished(), want.finished()
        assert (g.finish_reason, g.prompt_tokens, g.completion_tokens, g.generated) == \
            (w.finish_reason, w.prompt_tokens, w.completion_tokens, w.generated)
    assert engine.batch.running == 0 and not engine._paused


def test_cancelling_a_paused_turn_drops_it_and_the_others_go_on(demo):
    engine, specs = preempting(demo)
    cancelled = []

    def cancel_paused(jobs):
        for job in jobs:
            if job.paused and not cancelled:
                cancelled.append((job, len(job.paused)))
                engine.cancel(job)

    sinks = drive(engine, specs, cancel_paused)
    job, rows = cancelled[0]
    assert rows == 1 and job.closed and not job.paused and engine.rows_paused == 0
    i = [k for k, sink in enumerate(sinks) if sink.events and isinstance(sink.events[-1], Failed)]
    assert len(i) == 1 and sinks[i[0]].events[-1].message == "cancelled" and len(sinks[i[0]].tokens()) < 40
    for k, (spec, sink) in enumerate(zip(specs, sinks)):
        if k != i[0]:
            assert sink.tokens() == alone_once(demo, spec).tokens()
    assert engine.batch.running == 0 and not engine._paused


def test_a_prompt_being_prefilled_goes_back_to_the_queue_when_memory_runs_short(demo):
    """One turn decoding, a long prompt fed 16 tokens a round beside it; the budget drops mid-prefill (as if the
    running turn had outgrown it): the prompt, not the turn alone in the batch, goes back to the queue, starts over
    when it fits again, and both replies equal the turns alone."""
    from kimi_mlx.server.worker import Progress

    model, tok = demo
    engine = Engine(model, tok, EngineSettings(prefix_cache_bytes=0, prefill_step_size=16))
    engine.batch_memory = 1 << 40
    ban = {tok.im_end_id: -100.0, tok.eos_id: -100.0}
    specs = [TurnSpec(ids, GenerationOptions.from_kwargs(temperature=0.0, logit_bias=ban, max_tokens=30))
             for ids in (list(range(100, 120)), [100 + i % 300 for i in range(200)])]
    squeezed = []

    def squeeze(jobs):
        if not squeezed and engine._admitting is not None and engine._active and jobs[1].generated == 0:
            squeezed.append(engine.step_bytes())
            engine.batch_memory = squeezed[0] - 1  # the next step's check cannot pass with the prompt held
        elif len(squeezed) == 1 and jobs[1] in engine._pending:
            squeezed.append(True)
            engine.batch_memory = 1 << 40

    sinks = drive(engine, specs, squeeze)
    assert len(squeezed) == 2 and engine.preemptions == 0
    done = [e.done for e in sinks[1].events if isinstance(e, Progress)]
    assert any(b <= a for a, b in zip(done, done[1:])) and done[-1] == 199  # it started over
    for spec, sink in zip(specs, sinks):
        assert sink.tokens() == alone(demo, spec).tokens() and len(sink.tokens()) == 30


def test_concurrent_streams_over_http_are_preempted_and_reply_as_alone(demo, tmp_path):
    """Three streamed chat completions without max_tokens under a --batch-memory that admits them together (rows
    reserved a page ahead) but cannot hold them at their longest: one is preempted, and each reply equals the
    request alone."""
    from kimi_mlx.server.worker import PREEMPT_HORIZON, StateSize
    from kimi_mlx.state import page_size

    model, tok = demo
    cap = 310  # --max-tokens: the replies' length (the ban keeps them from ending sooner)
    texts = [f"story {i}: " + "tell me about a fox " * k for i, k in enumerate((23, 24, 25))]
    lengths = [len(chat_ids(tok, t)) for t in texts]
    size = StateSize(model, 3)
    # what admitting the last of the three checks: the three rows reserved at the longest prompt + the horizon,
    # and its prompt's batch-1 state while it is prefilled
    budget = size.batch(3, max(lengths) + PREEMPT_HORIZON) + size.single(max(lengths))
    # the same page holds the first admitted rows' head start (tokens decoded before the last is admitted)
    assert page_size(max(lengths) + PREEMPT_HORIZON + 32) == page_size(max(lengths) + PREEMPT_HORIZON)
    assert PREEMPT_HORIZON < cap  # rows reserved by the horizon, not at their longest
    assert size.batch(3, max(lengths) + cap) > budget  # the three cannot all reach their last step in the batch
    server = start_server(tmp_path, "--max-batch", "3", "--prefill-step-size", "512", "--max-tokens", str(cap),
                          "--batch-memory", str(budget))
    kw = dict(model="demo", temperature=0, logit_bias=no_stop_bias())
    try:
        async def main():
            client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
            try:
                async def one(text):
                    reply, finish = "", None
                    async for chunk in await client.chat.completions.create(messages=user(text), stream=True, **kw):
                        for ch in chunk.choices:
                            reply += ch.delta.content or ""
                            finish = ch.finish_reason or finish
                    return reply, finish
                return await asyncio.gather(*(one(t) for t in texts))
            finally:
                await client.close()

        together = asyncio.run(main())
        assert server.wait_idle(10) < 10
        health = server.health()
        assert health["preemptions"] >= 1 and health["paused"] == 0 and health["running"] == 0
        c = server.client()
        for text, (reply, finish) in zip(texts, together):
            want = c.chat.completions.create(messages=user(text), **kw)
            assert (reply, finish) == (want.choices[0].message.content, want.choices[0].finish_reason)
            assert want.usage.completion_tokens == cap
    finally:
        stop_server(server)
