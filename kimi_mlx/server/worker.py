"""The model's one owner: a worker thread that runs queued turns one at a time.

A turn restores the longest cached prefix state of its input, feeds the rest in chunks (taking a
snapshot at every message end and every `snapshot_interval` tokens, checking for cancellation between
chunks), then generates through the runtime's `Generation`. Results go to the request's sink as events.
A cancelled turn stops at the next chunk or token and its working state is dropped. A scoring turn
(completions with echo and logprobs) feeds its prompt from the empty state instead, reading the
log-probability of every prompt token from the logits on the way.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace, field

import mlx.core as mx

from ..errors import KimiError
from ..generate import Generation, GenerationOptions, prefill, stop_ids
from ..speculate import SpecStats
from .constrain import Grammars, ban_tokens, once
from .prefix_cache import PrefixCache

log = logging.getLogger("kimi_mlx.server")


@dataclass
class TurnSpec:
    prompt: list[int]  # the model's input
    options: GenerationOptions
    forced: list[int] = field(default_factory=list)  # the reply starts with these ids (fed as input)
    grammar: str | None = None  # llguidance grammar for the generated part
    banned: list[int] = field(default_factory=list)  # ids never drawn
    once: list[int] = field(default_factory=list)  # ids drawn at most once
    score: bool = False  # report the prompt tokens' log-probabilities (a Scored event) before generating
    generate: bool = True  # False: score only (max_tokens 0)
    warnings: list[str] = field(default_factory=list)  # parts of the request served relaxed (a response header)


class ReplyIds:
    """The ids behind recent replies. A client sends a reply back as text (and tool calls as JSON), which
    may encode to other ids than the model generated (BPE is not unique, and a forced call's name was drawn
    token by token); rendering it from the generated ids makes the conversation match the cached state
    exactly, so the reply itself is reused too. Replies with tool calls are found by their call ids (which
    are unique), and used only if the resent content, names and arguments are the ones generated."""

    def __init__(self, max_entries: int = 1024):
        self.max_entries = max_entries
        self._ids: OrderedDict[str, list[int]] = OrderedDict()
        self._calls: OrderedDict[tuple, tuple[str, list, list[int]]] = OrderedDict()
        self._lock = threading.Lock()

    def _put(self, table: OrderedDict, key, value) -> None:
        with self._lock:
            table[key] = value
            table.move_to_end(key)
            while len(table) > self.max_entries:
                table.popitem(last=False)

    def remember(self, tokenizer, ids: list[int], stops: set[int]) -> None:
        body = ids[:-1] if ids and ids[-1] in stops else ids
        text = tokenizer.decode(body)
        if "\ufffd" in text or not text:
            return  # not valid text: the client cannot send it back unchanged
        self._put(self._ids, text, list(body))

    def remember_calls(self, calls, content: str, ids: list[int], stops: set[int]) -> None:
        """A reply with tool calls (objects with id, name, arguments), by its call ids."""
        body = ids[:-1] if ids and ids[-1] in stops else ids
        self._put(self._calls, tuple(c.id for c in calls), (content, [(c.name, c.arguments) for c in calls],
                                                            list(body)))

    def ids_for(self, text) -> list[int] | None:
        with self._lock:
            return self._ids.get(text) if isinstance(text, str) else None

    def ids_for_calls(self, message: dict) -> list[int] | None:
        calls = message.get("tool_calls") or []
        with self._lock:
            hit = self._calls.get(tuple(c.get("id") for c in calls))
        if hit is None:
            return None
        content, made, ids = hit
        sent = [(c["function"]["name"], c["function"]["arguments"]) for c in calls]
        return ids if (message.get("content") or "") == content and sent == made else None


class CallIds:
    """call id given to a client -> the header the model wrote for that call (functions.NAME:IDX), for the
    most recent calls (bounded: an id that aged out renders as the header the model would write there)."""

    def __init__(self, max_entries: int = 4096):
        self.max_entries = max_entries
        self._headers: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, call_id: str, header: str) -> None:
        if not header:
            return
        with self._lock:
            self._headers[call_id] = header
            self._headers.move_to_end(call_id)
            while len(self._headers) > self.max_entries:
                self._headers.popitem(last=False)

    def header_for(self, call_id: str) -> str | None:
        with self._lock:
            return self._headers.get(call_id)


@dataclass
class Progress:
    done: int
    total: int


@dataclass
class Piece:
    text: str
    token: int | None  # None for forced text
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class Scored:
    """Log-probabilities of the prompt's tokens: (token, logprob, top) each; the first token's are None."""

    entries: list[tuple[int, float | None, list[tuple[int, float]] | None]]


@dataclass
class Finished:
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    prefill_seconds: float
    generated: list[int] = field(default_factory=list)  # forced + generated ids (a stop token included)
    state_tokens: list[int] | None = None  # what the stored final state consumed (None: none stored)


@dataclass
class Failed:
    message: str
    client_error: bool  # the request could not be served as asked (vs. a fault of the server)


Event = Progress | Scored | Piece | Finished | Failed


class QueueFull(Exception):
    pass


class Job:
    def __init__(self, spec: TurnSpec, sink: Callable[[Event], None]):
        self.spec, self._sink = spec, sink
        self.cancel = threading.Event()
        self.dequeued = False  # no longer counted as waiting (started, or dropped while waiting)

    def emit(self, event: Event) -> None:
        try:
            self._sink(event)
        except RuntimeError:  # the request's event loop is gone: nobody is listening
            self.cancel.set()


@dataclass
class EngineSettings:
    max_queue: int = 64  # requests waiting (besides the running one)
    prefix_cache_bytes: int = 4 << 30
    snapshot_interval: int = 2048  # also snapshot every this many prompt tokens
    prefill_step_size: int = 0  # 0: auto (generate.step_length), within the snapshot_interval cuts
    max_tokens: int | None = None  # reply cap for requests that give none (None: up to the context limit)
    draft: str | None = None  # speculative decoding for requests that do not turn it off ("ngram" or a path)
    num_draft: int = 0  # 0: the draft's default
    ngram: int = 3


class Engine:
    def __init__(self, model, tokenizer, settings: EngineSettings):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.cache = PrefixCache(settings.prefix_cache_bytes)
        self.replies = ReplyIds()
        self.call_ids = CallIds()
        self.grammars = Grammars(tokenizer, model.config.vocab_size)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self.running: Job | None = None
        self.spec = SpecStats()  # speculative decoding's counts over every reply served with a draft
        self.spec_replies = 0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="kimi-mlx-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            with self._lock:
                if self.running is not None:
                    self.running.cancel.set()
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    @property
    def waiting(self) -> int:
        return self._waiting

    def submit(self, spec: TurnSpec, sink: Callable[[Event], None]) -> Job:
        job = Job(spec, sink)
        with self._lock:
            if self._waiting >= self.settings.max_queue:
                raise QueueFull(f"{self._waiting} requests already waiting (--max-queue {self.settings.max_queue})")
            self._waiting += 1
        self._queue.put(job)
        return job

    def cancel(self, job: Job) -> None:
        """Stop `job`: a running turn stops at its next chunk or token; a waiting one frees its place now."""
        with self._lock:
            job.cancel.set()
            self._dequeue(job)

    def _dequeue(self, job: Job) -> None:
        if not job.dequeued:
            job.dequeued = True
            self._waiting -= 1

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._dequeue(job)
                self.running = job
            try:
                if not job.cancel.is_set():
                    self.run_turn(job)
            except KimiError as e:
                job.emit(Failed(str(e), client_error=True))
            except Exception as e:  # a server fault: keep serving the others
                log.exception("turn failed")
                job.emit(Failed(f"internal error: {type(e).__name__}: {e}", client_error=False))
            finally:
                with self._lock:
                    self.running = None

    def run_turn(self, job: Job) -> None:
        spec, model = job.spec, self.model
        seq = spec.prompt + spec.forced
        t0 = time.perf_counter()
        if spec.score:
            cached, state = 0, model.new_state(1)
            entries = self.score(job, state, seq)
            if entries is None:
                return job.emit(Failed("cancelled", client_error=True))
            job.emit(Scored(entries))
            if not spec.generate:
                return job.emit(Finished("length", len(spec.prompt), 0, 0, time.perf_counter() - t0))
        else:
            cached, state = self.cache.lookup(seq, max_len=len(seq) - 1)
            state = state or model.new_state(1)
            pos = cached
            for end, keep in self.prefill_plan(seq, cached):
                if job.cancel.is_set():
                    return job.emit(Failed("cancelled", client_error=True))
                prefill(model, state, seq[pos:end], self.settings.prefill_step_size)
                pos = end
                if keep:
                    self.cache.insert(seq[:end], state)
                job.emit(Progress(end, len(seq)))
        options = spec.options
        if spec.grammar is not None or spec.once:  # stateful processors follow one sequence, not drafts
            options = replace(options, draft=None)
        gen = Generation(model, self.tokenizer, state, seq[-1:], options, context=seq[:-1])
        if spec.banned:
            gen.processors.append(ban_tokens(spec.banned))
        gen.processors += [once(t) for t in spec.once]
        if spec.grammar is not None:
            gen.processors.append(self.grammars.processor(spec.grammar))
        prefill_seconds = None
        if spec.forced:
            job.emit(Piece(self.tokenizer.decode(spec.forced), None))
        for r in gen:
            if job.cancel.is_set():
                return job.emit(Failed("cancelled", client_error=True))
            prefill_seconds = prefill_seconds or time.perf_counter() - t0
            job.emit(Piece(r.text, r.token, r.logprob, r.top_logprobs))
        if gen.draft is not None:
            self.spec_replies += 1
            for f in ("drafted", "accepted", "forwards", "tokens"):
                setattr(self.spec, f, getattr(self.spec, f) + getattr(gen.spec, f))
        consumed = (seq + gen.tokens)[: state.offset]
        kept = self.cache.insert(consumed, state)
        self.replies.remember(self.tokenizer, spec.forced + gen.tokens, stop_ids(model, self.tokenizer))
        job.emit(Finished(gen.finish_reason or "stop", len(spec.prompt), min(cached, len(spec.prompt)),
                          len(spec.forced) + len(gen.tokens), prefill_seconds or 0.0, spec.forced + gen.tokens,
                          consumed if kept else None))

    SCORE_STEP = 256  # prompt tokens a scoring step: its float32 log-softmax is SCORE_STEP x vocab (168 MB)

    def score(self, job: Job, state, seq: list[int]):
        """Feed seq[:-1] into `state`, returning every token's (token, logprob, top) given the tokens
        before it (the first has none); None if cancelled. The last token is left for Generation."""
        top = job.spec.options.top_logprobs
        entries = [(seq[0], None, None)]
        for a in range(0, len(seq) - 1, self.SCORE_STEP):
            if job.cancel.is_set():
                return None
            b = min(a + self.SCORE_STEP, len(seq) - 1)
            logits = self.model(mx.array([seq[a:b]]), state)[0].astype(mx.float32)
            lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            targets = mx.array(seq[a + 1 : b + 1])
            chosen = mx.take_along_axis(lp, targets[:, None], axis=-1)[:, 0]
            if top:
                idx = mx.argpartition(-lp, kth=top - 1, axis=-1)[:, :top]
                vals = mx.take_along_axis(lp, idx, axis=-1)
                mx.eval(chosen, idx, vals)
                rows = [sorted(zip(i, v), key=lambda iv: -iv[1]) for i, v in zip(idx.tolist(), vals.tolist())]
            else:
                mx.eval(chosen)
                rows = [None] * (b - a)
            state.eval()
            entries += [(t, c, r) for t, c, r in zip(seq[a + 1 : b + 1], chosen.tolist(), rows)]
            job.emit(Progress(b, len(seq)))
        return entries

    def prefill_plan(self, seq: list[int], start: int) -> list[tuple[int, bool]]:
        """(end, snapshot?) chunks covering seq[start:-1]: cut at every message end (after <|im_end|>),
        every snapshot_interval tokens (both snapshotted) and every prefill_step_size tokens (if set)."""
        last = len(seq) - 1
        s = self.settings
        keep = {i + 1 for i in range(start, last) if seq[i] == self.tokenizer.im_end_id}
        keep |= set(range(s.snapshot_interval, last + 1, s.snapshot_interval))
        cuts = {p for p in keep if start < p <= last}
        if s.prefill_step_size:  # (auto steps are cut inside each chunk, by generate.prefill)
            cuts |= set(range(start + s.prefill_step_size, last, s.prefill_step_size))
        if start < last:
            cuts.add(last)
        return [(p, p in keep) for p in sorted(cuts)]
