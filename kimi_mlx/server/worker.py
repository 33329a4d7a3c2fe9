"""The model's one owner: an engine thread that schedules queued turns onto a BatchGenerator.

Each iteration of the engine thread (a round) does a bounded amount of work: prefill steps of the requests at
the head of the queue, up to a prefill step's worth of tokens (`prefill_budget`; at least one step), then one
decode step of every running row (BatchGenerator.step). So running rows are never starved by a long prompt
(it is fed a step a round), a burst of short prompts joins in one round, and a new request joins while others
are replying (when the batch has rows free for it; else it waits in the queue). Admitting a turn restores the
longest cached prefix state of its input and feeds the rest step by step, snapshotting into the prefix cache at
every message end and every `snapshot_interval` tokens; cancellation is checked between rounds. When the prompt
is in, the state joins the batch as n rows (a prefix-cache hit that covers the whole prompt joins at once: the
snapshot is the state inserted). Each row's tokens go to its request's sink as events; a finished row's final
state is stored in the prefix cache for the next turn. A cancelled turn leaves at the next round and its working
state is dropped. A scoring turn (completions with echo and logprobs) feeds its prompt from the empty state
instead, reading the log-probability of every prompt token from the logits on the way. A speculative turn (a
draft, one choice, no grammar) decodes on its own batch-1 state beside the batch: one round of it (one forward of
the model, a verification or a plain step) each iteration, after the batch's step; it counts as a sequence of
the batch's `max_batch` and its state as held memory (reserved at its longest: it is not preempted).

Memory: the rows' states (the batched state, paused rows, the prompt being prefilled) are held within
`batch_memory`, optimistically. A turn is admitted (and a paused one resumed) if the batch's state, with its rows
added and every row reserved at min(its longest, its current length + PREEMPT_HORIZON), plus its own batch-1
state while it is prefilled and the paused rows' bytes, fits (`StateSize.batch`: the batched state gives every
slot room for the longest row). Rows that may reply up to the context limit (a request without max_tokens) are
not reserved at that worst case, so they batch. Before every decode step the engine checks the state the step
will hold: the batch at the rows' current lengths plus that step's growth (a growing page counted twice: it is
copied), the paused rows and a prompt being prefilled; if that exceeds batch_memory it gives the batch's freed
slots back (BatchGenerator.compact), then preempts the most recently admitted running turn: all its rows are
paused (BatchGenerator.pause: their states copied out of the batch, which is then compacted) and it goes to the
head of the line; with one turn left in the batch, a prompt being prefilled goes back to the queue (its
prefix-cache snapshots kept). This repeats until the step fits or one turn is left: a turn alone always runs (as
a one-at-a-time server would run it; only then can the states go past batch_memory, as a turn longer than the
budget does on its own, with any paused states). So while turns share the batch the states never outgrow the
budget (no out-of-memory by construction of that check; transient copies inside a step aside, which the
headroom below batch_memory covers). Paused turns resume first-admitted first, before any new turn is admitted,
when they fit again; their clients see only a pause in the stream (the same tokens, finish and usage). The
cost: a paused turn waits (and its state is copied out and back in). The queue is bounded by `max_queue`
(more: QueueFull, a 503).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, replace, field

import mlx.core as mx

from ..batch import BatchGenerator, PausedRow
from ..errors import KimiError
from ..feed import PREFILL_STEP, prefill_step, step_lengths
from ..generate import Generation, GenerationOptions, stop_ids
from ..speculate import SpecStats
from ..batch_state import layout_bytes, slots_for
from ..state import PAGE_FIRST, MLAState, encode_rows
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
    n: int = 1  # choices: rows sharing the one prefilled prompt


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
    index: int = 0  # the choice (row) of the turn's n


@dataclass
class Scored:
    """Log-probabilities of the prompt's tokens: (token, logprob, top) each; the first token's are None."""

    entries: list[tuple[int, float | None, list[tuple[int, float]] | None]]


@dataclass
class Finished:
    """One choice is done (a turn of n choices sends n of these, one per index, in the order they finish)."""

    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int  # this choice's
    prefill_seconds: float
    generated: list[int] = field(default_factory=list)  # forced + generated ids (a stop token included)
    state_tokens: list[int] | None = None  # what the stored final state consumed (None: none stored)
    index: int = 0


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
        self.longest = len(spec.prompt) + len(spec.forced) + spec.options.max_tokens  # tokens a row may reach
        # engine-thread bookkeeping while admitted
        self.t0 = 0.0
        self.cached = 0
        self.first: float | None = None  # seconds from admission to the first generated token
        self.rows: dict[int, int] = {}  # batch sequence id -> choice index (its paused rows' too)
        self.order = 0  # admission number: preemption takes the latest admitted, resumption the first
        self.generated = 0  # decode steps its rows have taken (its n rows join, step, pause and resume together)
        self.paused: list[PausedRow] = []  # its rows while preempted
        self.closed = False  # every choice finished, or the turn failed: no more events
        self.speculation = None  # a speculative turn: (its Generation, that generation's Responses), while running

    @property
    def length(self) -> int:
        """Tokens each of its rows holds in the batch (its prompt, forced reply start and generated tokens)."""
        return len(self.spec.prompt) + len(self.spec.forced) + self.generated

    def emit(self, event: Event) -> None:
        try:
            self._sink(event)
        except RuntimeError:  # the request's event loop is gone: nobody is listening
            self.cancel.set()


@dataclass
class EngineSettings:
    max_queue: int = 64  # requests waiting (besides the running ones)
    prefix_cache_bytes: int = 4 << 30
    snapshot_interval: int = 2048  # also snapshot every this many prompt tokens
    prefill_step_size: int = 0  # 0: auto (feed.step_length), within the snapshot_interval cuts
    max_tokens: int | None = None  # reply cap for requests that give none (None: up to the context limit)
    max_batch: int = 8  # rows decoded together (a turn of n choices takes n)
    batch_memory: int | None = None  # bytes the rows' states may reserve; None: auto (auto_batch_memory)
    draft: str | None = None  # speculative decoding for requests that do not turn it off ("ngram" or a path)
    num_draft: int = 0  # 0: the draft's default
    ngram: int = 3


# Tokens past its current length each running row is reserved for (up to its longest) when a turn is admitted or
# resumed. Every row grows a token a decode step and the batched state follows its longest row, so a batch that
# fit with every row this far ahead decodes this many steps (unless another turn joins meanwhile) before the check
# before each step can preempt anyone: a preemption (a turn's states copied out, later back in) is paid for by as
# many steps, and a resumed turn is not paused again at once. It is the first page of the growth sequence
# (state.page_size), the unit the MLA cache grows by, so it costs at most one more page per slot over the rows'
# current lengths.
PREEMPT_HORIZON = PAGE_FIRST

STATE_HEADROOM = 2 << 30  # what the automatic batch_memory leaves for step activations, a prefill step, the OS


def auto_batch_memory(prefix_cache_bytes: int) -> int:
    """The device's memory (doctor.device_memory: Metal's working set, the GPU's memory or the RAM) less what
    is in use now (the loaded weights), the prefix cache's budget and STATE_HEADROOM; 0 if nothing is left
    (then turns run one at a time)."""
    from ..doctor import device_memory

    total, _ = device_memory()
    if not total:
        return 0
    return max(0, total - mx.get_active_memory() - prefix_cache_bytes - STATE_HEADROOM)


class StateSize:
    """State bytes of this model. `single(tokens)`: a batch-1 state after `tokens` tokens (the KDA state plus,
    per MLA layer, the pages at their rounded capacity and one more last page for the copy made while it
    grows; see state.py). `batch(rows, longest)`: the batched state (batch_state.py, whose layout_bytes it uses)
    of `rows` rows with the longest at `longest` tokens: its slots (rows rounded up to a power of two, up to
    max_batch; at least `slots`, a batch's present capacity) each hold the KDA state and MLA rows for the longest
    row, at the page size holding it (at least `page` rows, a batch's present page), twice (a growing page is
    copied)."""

    def __init__(self, model, max_batch: int):
        state = model.new_state(1)
        self.fixed = state.nbytes
        mla = [s for s in state.layers if isinstance(s, MLAState)]
        self.layers = len(mla)
        bits = mla[0].bits if mla else 0
        row = encode_rows(mx.zeros((1, 1, model.config.latent_dim), model.dtype), bits, model.dtype)
        self.row = sum(a.nbytes for a in row)
        self.pages = MLAState()
        self.max_batch = max_batch

    def single(self, tokens: int) -> int:
        full, rest = divmod(tokens, self.pages.page_max)
        last = self.pages.page_size(rest) if rest else 0
        return self.fixed + self.layers * self.row * (full * self.pages.page_max + 2 * last)

    def batch(self, rows: int, longest: int, slots: int = 0, page: int = 0) -> int:
        if rows == 0:
            return 0
        return layout_bytes(max(slots, slots_for(rows, self.max_batch)), max(longest, page), self.fixed,
                            self.layers * self.row, copies=2)


def _await_thread_exit(native_id: int | None, limit: float = 2.0) -> None:
    """Wait (at most `limit` seconds) until the OS thread `native_id` has ended, where the system lists its threads
    (Linux: /proc/self/task). Python's join returns before a thread's C++ thread-local destructors have run (MLX
    keeps per-thread stream state there); a process that exits meanwhile (a server stopped right after its engine)
    runs its static destructors alongside them, and the C++ runtime aborts it ('terminate called without an
    active exception')."""
    task = f"/proc/self/task/{native_id}"
    if native_id is None or not os.path.isdir("/proc/self/task"):
        return
    end = time.perf_counter() + limit
    while os.path.exists(task) and time.perf_counter() < end:
        time.sleep(0.001)


class Engine:
    def __init__(self, model, tokenizer, settings: EngineSettings):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.cache = PrefixCache(settings.prefix_cache_bytes)
        self.replies = ReplyIds()
        self.call_ids = CallIds()
        self.grammars = Grammars(tokenizer, model.config.vocab_size)
        self.batch = BatchGenerator(model, tokenizer, max_batch=settings.max_batch)
        self.state_size = StateSize(model, settings.max_batch)
        self.batch_memory = (auto_batch_memory(settings.prefix_cache_bytes) if settings.batch_memory is None
                             else settings.batch_memory)
        self.stops = stop_ids(model, tokenizer)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._pending: deque[Job] = deque()  # taken off _queue by the engine thread, not admitted yet
        self._admitting: list | None = None  # [job, its prefill steps (a generator), next step's tokens or None]
        # prompt tokens fed between two decode steps (at least one prefill step): bounds what a new prompt
        # delays the running rows by, and lets a burst of short prompts join in one round
        self.prefill_budget = settings.prefill_step_size or PREFILL_STEP
        self._active: list[Job] = []  # jobs with rows in the batch
        self._paused: list[Job] = []  # preempted turns, by admission (the first admitted resumes first)
        self._speculating: list[Job] = []  # speculative turns: each its own batch-1 state, a round an iteration
        self._admitted = 0  # turns admitted so far (Job.order)
        self.horizon = PREEMPT_HORIZON  # see PREEMPT_HORIZON
        self.preemptions = 0  # turns paused so far (/health)
        self.rows_paused = 0  # rows of paused turns (read by /health)
        self._rows: dict[int, Job] = {}  # batch sequence id -> job
        self.rows_running = 0  # rows in the batch (read by /health)
        self.prefilling = 0  # turns whose prompt is being fed (read by /health)
        self.spec = SpecStats()  # speculative decoding's counts over every reply served with a draft (/stats)
        self.spec_replies = 0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="kimi-mlx-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            if not self._thread.is_alive():
                _await_thread_exit(self._thread.native_id)
            self._thread = None

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def busy(self) -> bool:
        return bool(self.rows_running or self.prefilling or self.rows_paused)

    @property
    def _free_rows(self) -> int:
        """Sequences that may still start: the batch's free rows less the speculative turns (each a sequence
        decoding beside the batch; --max-batch bounds both together)."""
        return self.batch.free - len(self._speculating)

    def submit(self, spec: TurnSpec, sink: Callable[[Event], None]) -> Job:
        if spec.n > self.settings.max_batch:  # the request layer says so first, naming the field
            raise KimiError(f"n: {spec.n} choices exceed the batch of {self.settings.max_batch} rows")
        job = Job(spec, sink)
        with self._lock:
            if self._waiting >= self.settings.max_queue:
                raise QueueFull(f"{self._waiting} requests already waiting (--max-queue {self.settings.max_queue})")
            self._waiting += 1
        self._queue.put(job)
        return job

    def cancel(self, job: Job) -> None:
        """Stop `job`: a running turn leaves at the next iteration; a waiting one frees its place now."""
        with self._lock:
            job.cancel.set()
            self._dequeue(job)

    def _dequeue(self, job: Job) -> None:
        if not job.dequeued:
            job.dequeued = True
            self._waiting -= 1

    def run_turn(self, job: Job) -> None:
        """Serve `job` on the calling thread, start to end, with whatever else is in the batch (for tests and
        scripts; the engine thread must not be running)."""
        if self._thread is not None:
            raise KimiError("run_turn is for an engine whose thread is not started")
        if not self._started():
            self._new_batch()
        with self._lock:
            self._waiting += 1
        self._pending.append(job)
        while not job.closed and (job in self._pending or self._started()):
            self._iterate()

    # -- the engine thread ------------------------------------------------------------------------------
    def _iterate(self) -> None:
        """One scheduling round: drop cancelled turns, resume paused turns that fit again (`_resume`), prefill
        waiting prompts up to prefill_budget tokens (`_admit`), preempt turns while the step would not fit
        (`_preempt`), one decode step of every running row, one round (a forward) of every speculative turn."""
        self._drop_cancelled()
        self._resume()
        self._admit()
        if self.batch.running:
            self._preempt()
            self._decode()
        if self._speculating:
            self._speculate()
        self.rows_running = self.batch.running + len(self._speculating)
        self.rows_paused = sum(len(j.paused) for j in self._paused)
        self.prefilling = int(self._admitting is not None)

    def _new_batch(self) -> None:
        """A fresh BatchGenerator, made on the thread that will step it: MLX evaluates an array on the stream
        of the thread that made it, which another thread cannot reach (a restarted engine thread would fail
        on a batch the previous one made)."""
        self.batch = BatchGenerator(self.model, self.tokenizer, max_batch=self.settings.max_batch,
                                    reference=self.batch.reference)
        self._rows.clear()

    def _loop(self) -> None:
        self._new_batch()  # (no rows run while the thread is down: stop() ends every started turn)
        try:
            while self._take():
                try:
                    self._iterate()
                except Exception as e:  # a fault outside one turn's own work: fail the started turns, go on
                    self._fail_all(self._failure(e))
        finally:
            for job in self._started():
                self._fail(job, Failed("the server is shutting down", client_error=False))
            self.rows_running = self.prefilling = self.rows_paused = 0

    def _take(self) -> bool:
        """Move submitted jobs to _pending, blocking while there is nothing else to do. False: stop."""
        block = not (self._active or self._admitting or self._pending or self._paused or self._speculating)
        while True:
            try:
                job = self._queue.get(block=block)
            except queue.Empty:
                return True
            if job is None:
                return False
            self._pending.append(job)
            block = False

    def _started(self) -> list[Job]:
        jobs = list(self._active) + list(self._paused) + list(self._speculating)
        if self._admitting is not None and self._admitting[0] not in jobs:
            jobs.append(self._admitting[0])
        return jobs

    def _drop_cancelled(self) -> None:
        for job in self._started():
            if job.cancel.is_set():
                self._fail(job, Failed("cancelled", client_error=True))
        while self._pending and self._pending[0].cancel.is_set():
            self._pending.popleft()  # cancel() has already freed its place in the queue

    def _fail(self, job: Job, event: Failed) -> None:
        """End a started job: its rows leave the batch, its sink hears `event`."""
        for seq in list(job.rows):
            try:
                self.batch.remove(seq)
            except KimiError:
                pass  # it left already
            self._rows.pop(seq, None)
        job.rows.clear()
        job.paused.clear()  # (a paused turn's states are dropped with it)
        if self._admitting is not None and self._admitting[0] is job:
            self._admitting[1].close()
            self._admitting = None
        self._close(job)
        job.emit(event)

    def _fail_all(self, event: Failed) -> None:
        """The batch's state is unknown after a fault in it: every started turn fails, a fresh batch begins."""
        for job in self._started():
            try:
                self._fail(job, event)
            except Exception:
                log.exception("dropping a failed turn")
                self._close(job)
        self._admitting = None
        self._new_batch()

    def _close(self, job: Job) -> None:
        if not job.closed:
            job.closed = True
            if job in self._active:
                self._active.remove(job)
            if job in self._paused:
                self._paused.remove(job)
            if job in self._speculating:
                self._speculating.remove(job)
        if job.speculation is not None:
            job.speculation[1].close()  # its generation rewinds its state to the last token taken
            job.speculation = None

    def _admit(self) -> None:
        """Prefill steps of the turns at the head of the queue, up to `prefill_budget` tokens a round (at least
        one step): a turn starts once the batch has rows for it and memory for them (`fits`), and joins the
        batch when its prompt is in; the next may start in the same round (a burst of short prompts joins at
        once, while a long one is fed a step a round)."""
        fed = 0
        while fed < self.prefill_budget:
            if self._admitting is None:
                if self._paused:
                    return  # a paused turn resumes before any new turn starts
                while self._pending and self._pending[0].cancel.is_set():
                    self._pending.popleft()
                if not self._pending:
                    return
                job = self._pending[0]
                if job.spec.n > self._free_rows or not self.fits(job):
                    return
                self._pending.popleft()
                with self._lock:
                    self._dequeue(job)
                job.t0 = time.perf_counter()
                self._admitted += 1
                job.order = self._admitted
                self._admitting = [job, self._prepare(job), None]
                self.prefilling = 1  # (before its first step: /health reads it meanwhile)
            job, steps, size = self._admitting
            try:
                try:
                    if size is None:  # the turn's first announcement: its next step's tokens (nothing fed yet)
                        size = self._admitting[2] = next(steps)
                    if fed and fed + size > self.prefill_budget:
                        return  # the next round feeds it
                    fed += size
                    self._admitting[2] = next(steps)  # feeds the step; announces the next one
                    continue
                except StopIteration as done:
                    self._admitting = None
                    prompt_in = done.value
                if prompt_in is None:
                    self._close(job)  # nothing to generate (a scoring-only turn: Finished was sent)
                else:
                    self._insert(job, *prompt_in)
            except Exception as e:
                self._admitting = None
                self._fail(job, self._failure(e))

    def reserved(self, job: Job) -> int:
        """The length a turn's rows are reserved at when it is admitted or resumed: see PREEMPT_HORIZON."""
        return min(job.longest, job.length + self.horizon)

    def _held(self, skip: Job | None = None) -> int:
        """Bytes held besides the batch: the paused rows (but `skip`'s), the prompt being prefilled (at its
        full length, as admission reserved it) and the speculative turns' states (each at its longest: they are
        not preempted)."""
        held = sum(p.nbytes for j in self._paused if j is not skip for p in j.paused)
        held += sum(self.state_size.single(j.longest) for j in self._speculating)
        if self._admitting is not None:
            spec = self._admitting[0].spec
            held += self.state_size.single(len(spec.prompt) + len(spec.forced))
        return held

    def _batch_bytes(self, rows: int, longest: int) -> int:
        """StateSize.batch of `rows` rows up to `longest` tokens, at least the batch's present slots and page."""
        return self.state_size.batch(rows, longest, *self.batch.layout)

    def _room_for(self, job: Job, rows: int, held: int) -> bool:
        """Whether the batch's state with `rows` rows of `job` added, every row reserved at `reserved`, plus `held`
        bytes beside it, stays within batch_memory."""
        longest = max(self.reserved(j) for j in [*self._active, job])
        return self._batch_bytes(self.batch.running + rows, longest) + held <= self.batch_memory

    def fits(self, job: Job) -> bool:
        """Whether `job` may start: the batch's state with its rows added, plus its own batch-1 state while it is
        prefilled and the paused rows, within batch_memory (always, when nothing else is started)."""
        if not self._started():
            return True
        spec = job.spec
        return self._room_for(job, spec.n, self._held() + self.state_size.single(len(spec.prompt) + len(spec.forced)))

    def step_bytes(self) -> int:
        """Bytes the next decode step holds: the batch at the rows' current lengths plus the step's row (a
        growing page counted twice), the paused rows and the prompt being prefilled."""
        if not self._active:
            return self._held()
        return self._batch_bytes(self.batch.running, max(j.length for j in self._active) + 1) + self._held()

    def _preempt(self) -> None:
        """Before a decode step: while what it would hold (step_bytes) exceeds batch_memory, give the batch's
        freed slots back (compact), then pause the most recently admitted turn (all its rows; it goes to the
        head of the line), or send a turn being prefilled back to the queue, until it fits or one turn is left
        (a turn alone always runs)."""
        if self.step_bytes() <= self.batch_memory:
            return
        self.batch.compact()
        while self.step_bytes() > self.batch_memory:
            if len(self._active) > 1:
                self._pause(max(self._active, key=lambda j: j.order))
            elif self._admitting is not None and self._active:
                job = self._admitting[0]
                self._admitting[1].close()  # (its prefix-cache snapshots stay: it resumes from the longest)
                self._admitting = None
                self._pending.appendleft(job)
                log.info("memory: a prompt being prefilled goes back to the queue")
            else:
                return

    def _pause(self, job: Job) -> None:
        job.paused = [self.batch.pause(seq) for seq in job.rows]
        self.batch.compact()
        self._active.remove(job)
        self._paused.append(job)
        self._paused.sort(key=lambda j: j.order)
        self.preemptions += 1
        log.info("memory: a turn of %d rows is paused (%d bytes)", len(job.paused),
                 sum(p.nbytes for p in job.paused))

    def _resume(self) -> None:
        """Paused turns back into the batch, first admitted first, while each fits (rows free, and the batch with
        its rows reserved at `reserved` within batch_memory; always, when nothing else runs)."""
        while self._paused:
            job = self._paused[0]
            if len(job.paused) > self._free_rows:
                return
            if (self._active or self._admitting is not None or self._speculating) and \
                    not self._room_for(job, len(job.paused), self._held(skip=job)):
                return
            self._paused.pop(0)
            for p in job.paused:
                self.batch.resume(p)
            job.paused = []
            self._active.append(job)

    @staticmethod
    def _failure(e: Exception) -> Failed:
        if isinstance(e, KimiError):
            return Failed(str(e), client_error=True)
        log.exception("turn failed", exc_info=e)
        return Failed(f"internal error: {type(e).__name__}: {e}", client_error=False)

    def _prepare(self, job: Job):
        """The prompt's prefill as a generator that announces each step's tokens before feeding it (a next()
        feeds the announced step and announces the one after); returns (state, last token) for insert, or None
        when the turn ends here (scoring only). Raises KimiError for a request that cannot be served."""
        spec, model = job.spec, self.model
        seq = spec.prompt + spec.forced
        if spec.score:
            state = model.new_state(1)
            entries = yield from self.score(job, state, seq)
            job.emit(Scored(entries))
            if not spec.generate:
                for j in range(spec.n):
                    job.emit(Finished("length", len(spec.prompt), 0, 0, time.perf_counter() - job.t0, index=j))
                return None
        else:
            cached, state = self.cache.lookup(seq, max_len=len(seq) - 1)
            state = state or model.new_state(1)
            job.cached = cached
            pos = cached
            for end, keep in self.prefill_plan(seq, cached):
                for n in step_lengths(state.offset, end - pos, self.settings.prefill_step_size):
                    yield n
                    prefill_step(model, state, mx.array([seq[pos : pos + n]]))
                    pos += n
                    job.emit(Progress(pos, len(seq)))
                if keep:
                    self.cache.insert(seq[:end], state)
        return state, seq[-1]

    def _insert(self, job: Job, state, last: int) -> None:
        spec = job.spec
        seq = spec.prompt + spec.forced
        # a speculative turn decodes beside the batch on its own state (speculation is per sequence), a round an
        # iteration; stateful processors (a grammar, `once`) follow one sequence, not drafts, so those turns join
        # the batch
        if spec.options.draft and spec.n == 1 and spec.grammar is None and not spec.once:
            return self._start_speculative(job, state, last)

        def processors() -> list:  # each row its own: the grammar and `once` keep per-row state
            procs = [ban_tokens(spec.banned)] if spec.banned else []
            procs += [once(t) for t in spec.once]
            if spec.grammar is not None:
                procs.append(self.grammars.processor(spec.grammar))
            return procs

        tail = seq[:-1][-spec.options.repetition_context_size :]
        options = replace(spec.options, draft=None)  # (a batched row decodes plainly)
        seqs = self.batch.insert(state, last, options, context_tail=tail, n=spec.n, processors=processors,
                                 prompt_seconds=time.perf_counter() - job.t0)
        job.rows = {s: j for j, s in enumerate(seqs)}
        for s in seqs:
            self._rows[s] = job
        self._active.append(job)
        if spec.forced:
            text = self.tokenizer.decode(spec.forced)
            for j in range(spec.n):
                job.emit(Piece(text, None, index=j))

    def _start_speculative(self, job: Job, state, last: int) -> None:
        """The turn's reply as a speculative Generation over its own batch-1 state (speculate.py), advanced a round
        an iteration by _speculate, so the batch's rows and this turn take turns rather than wait for each other."""
        spec = job.spec
        seq = spec.prompt + spec.forced
        gen = Generation(self.model, self.tokenizer, state, [last], spec.options, context=seq[:-1])
        if spec.banned:
            gen.processors.append(ban_tokens(spec.banned))
        if spec.forced:
            job.emit(Piece(self.tokenizer.decode(spec.forced), None, index=0))
        job.speculation = (gen, iter(gen))
        self._speculating.append(job)

    def _speculate(self) -> None:
        """One round of every speculative turn: its Responses up to and including the first that took a forward
        of the model (a verification or a plain step), so each turn costs an iteration one forward, as a batch
        step costs its rows one; tokens a forward accepted beyond the first come out at the next round's start,
        free. A turn that fails ends alone (its state is its own)."""
        for job in list(self._speculating):
            gen, responses = job.speculation
            r = None
            try:
                forwards = gen.spec.forwards
                for r in responses:
                    if job.first is None:
                        job.first = time.perf_counter() - job.t0
                    job.emit(Piece(r.text, r.token, r.logprob, r.top_logprobs, 0))
                    job.generated += 1
                    if r.finish_reason or gen.spec.forwards != forwards:
                        break
                else:
                    r = None  # the generation ended (it ends on a finish reason; this is a guard)
            except Exception as e:
                self._fail(job, self._failure(e))
                continue
            if r is None or r.finish_reason:
                self._end_speculative(job, gen, r.finish_reason if r is not None else None)

    def _end_speculative(self, job: Job, gen: Generation, reason: str | None) -> None:
        """A speculative turn is done: its state (rewound to the last token taken) to the prefix cache, its ids
        remembered, Finished, as _finish does for a row."""
        spec = job.spec
        seq = spec.prompt + spec.forced
        self._close(job)  # closes the generation: its end rewinds the state to the last token taken
        self.spec_replies += 1
        for f in ("drafted", "accepted", "forwards", "tokens"):
            setattr(self.spec, f, getattr(self.spec, f) + getattr(gen.spec, f))
        tokens = list(gen.tokens)
        consumed, kept = (seq + tokens)[: gen.state.offset], False
        if self.cache.max_bytes > 0:
            kept = self.cache.insert(consumed, gen.state)
        self.replies.remember(self.tokenizer, spec.forced + tokens, self.stops)
        job.emit(Finished(reason or gen.finish_reason or "stop", len(spec.prompt), min(job.cached, len(spec.prompt)),
                          len(spec.forced) + len(tokens), job.first or 0.0, spec.forced + tokens,
                          consumed if kept else None, index=0))

    def _decode(self) -> None:
        try:
            results = self.batch.step()
        except Exception as e:
            return self._fail_all(self._failure(e))
        now = time.perf_counter()
        for job in self._active:
            job.generated += 1  # (every running turn's rows took this step)
        for seq, r in results:
            job = self._rows[seq]
            j = job.rows[seq]
            if job.first is None:
                job.first = now - job.t0
            job.emit(Piece(r.text, r.token, r.logprob, r.top_logprobs, j))
            if r.finish_reason:
                self._finish(job, seq, j, r.finish_reason)

    def _finish(self, job: Job, seq: int, j: int, reason: str) -> None:
        """A row is done: store its final state for the next turn, remember its ids, send Finished."""
        spec = job.spec
        tokens = self.batch.tokens(seq)
        consumed, kept = None, False
        if self.cache.max_bytes > 0:  # (reading a row's state back out of the batch costs a copy)
            state = self.batch.state(seq)  # readable until the next step
            consumed = (spec.prompt + spec.forced + tokens)[: state.offset]
            kept = self.cache.insert(consumed, state)
        self.replies.remember(self.tokenizer, spec.forced + tokens, self.stops)
        del job.rows[seq], self._rows[seq]
        if not job.rows:
            self._close(job)
        job.emit(Finished(reason, len(spec.prompt), min(job.cached, len(spec.prompt)),
                          len(spec.forced) + len(tokens), job.first or 0.0, spec.forced + tokens,
                          consumed if kept else None, index=j))

    SCORE_STEP = 256  # prompt tokens a scoring step: its float32 log-softmax is SCORE_STEP x vocab (168 MB)

    def score(self, job: Job, state, seq: list[int]):
        """Feed seq[:-1] into `state` (a generator announcing each step's tokens, as _prepare's), returning every
        token's (token, logprob, top) given the tokens before it (the first has none). The last token is left
        for the batch."""
        top = job.spec.options.top_logprobs
        entries = [(seq[0], None, None)]
        for a in range(0, len(seq) - 1, self.SCORE_STEP):
            b = min(a + self.SCORE_STEP, len(seq) - 1)
            yield b - a
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
        every snapshot_interval tokens (both snapshotted, when the prefix cache is on) and every
        prefill_step_size tokens (if set)."""
        last = len(seq) - 1
        s = self.settings
        keep = {i + 1 for i in range(start, last) if seq[i] == self.tokenizer.im_end_id}
        keep |= set(range(s.snapshot_interval, last + 1, s.snapshot_interval))
        if self.cache.max_bytes <= 0:  # no prefix cache: no snapshots, so no cuts for them
            keep = set()
        cuts = {p for p in keep if start < p <= last}
        if s.prefill_step_size:  # (auto steps are cut inside each chunk, as feed.prefill does)
            cuts |= set(range(start + s.prefill_step_size, last, s.prefill_step_size))
        if start < last:
            cuts.add(last)
        return [(p, p in keep) for p in sorted(cuts)]
