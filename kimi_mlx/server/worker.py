"""The model's one owner: a worker thread that runs queued turns one at a time.

A turn restores the longest cached prefix state of its input, feeds the rest in chunks (taking a
snapshot at every message end and every `snapshot_interval` tokens, checking for cancellation between
chunks), then generates through the runtime's `Generation`. Results go to the request's sink as events.
A cancelled turn stops at the next chunk or token and its working state is dropped.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import KimiError
from ..generate import Generation, GenerationOptions, prefill, stop_ids
from .constrain import Grammars, ban_tokens
from .prefix_cache import PrefixCache

log = logging.getLogger("kimi_mlx.server")


@dataclass
class TurnSpec:
    prompt: list[int]  # the model's input
    options: GenerationOptions
    forced: list[int] = field(default_factory=list)  # the reply starts with these ids (fed as input)
    grammar: str | None = None  # llguidance grammar for the generated part
    banned: list[int] = field(default_factory=list)  # ids never drawn


class ReplyIds:
    """The ids behind recent replies' text. A client sends a reply back as text, which may encode to
    other ids than the model generated (BPE is not unique); rendering it from the generated ids makes
    the conversation match the cached state exactly, so the reply itself is reused too."""

    def __init__(self, max_entries: int = 1024):
        self.max_entries = max_entries
        self._ids: OrderedDict[str, list[int]] = OrderedDict()

    def remember(self, tokenizer, ids: list[int], stops: set[int]) -> None:
        body = ids[:-1] if ids and ids[-1] in stops else ids
        text = tokenizer.decode(body)
        if "\ufffd" in text or not text:
            return  # not valid text: the client cannot send it back unchanged
        self._ids[text] = list(body)
        self._ids.move_to_end(text)
        while len(self._ids) > self.max_entries:
            self._ids.popitem(last=False)

    def ids_for(self, text) -> list[int] | None:
        return self._ids.get(text) if isinstance(text, str) else None


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
class Finished:
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    prefill_seconds: float


@dataclass
class Failed:
    message: str
    client_error: bool  # the request could not be served as asked (vs. a fault of the server)


Event = Progress | Piece | Finished | Failed


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


class Engine:
    def __init__(self, model, tokenizer, settings: EngineSettings):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.cache = PrefixCache(settings.prefix_cache_bytes)
        self.replies = ReplyIds()
        self.grammars = Grammars(tokenizer, model.config.vocab_size)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self.running: Job | None = None
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
        gen = Generation(model, self.tokenizer, state, seq[-1:], spec.options, context=seq[:-1])
        if spec.banned:
            gen.processors.append(ban_tokens(spec.banned))
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
        self.cache.insert((seq + gen.tokens)[: state.offset], state)
        self.replies.remember(self.tokenizer, spec.forced + gen.tokens, stop_ids(model, self.tokenizer))
        job.emit(Finished(gen.finish_reason or "stop", len(spec.prompt), min(cached, len(spec.prompt)),
                          len(spec.forced) + len(gen.tokens), prefill_seconds or 0.0))

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
