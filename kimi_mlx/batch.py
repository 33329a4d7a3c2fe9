"""Many sequences at once: BatchGenerator decodes a batch of rows together; rows join (insert) and leave
(finish, remove) between steps. batch_generate and stream_batch run a list of prompts through it.

Invariant: a row's Responses are the same whatever else is in the batch. Each row keeps its own sampling
(RowSampler: its own processors and Sampler key, so a seeded row draws the same stream alone or batched) and its
own ReplyText (text, stop strings, finish reason, timings), both shared with the single-sequence Generation.

A row can leave the batch and come back (pause, resume: a server's preemption when memory runs short): pause
returns a PausedRow holding everything the row needs to go on exactly (its batch-1 state, the token it has drawn
but not yet returned, its RowSampler and ReplyText), and a resumed row's Responses are those it would have
produced had it never left.

reference=True is the sequential twin: every row holds its own batch-1 ModelState and is stepped alone through
generate_step, the single-sequence decode. It is what the batched engine is tested against.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import mlx.core as mx

from .errors import KimiError
from .batch_state import BatchState, slots_for
from .feed import Step, prefill
from .generate import (GenerationOptions, ReplyText, Response, RowSampler, generate_step, prompt_ids, reply_room,
                       row_options, sampling_context)
from .sample import Sampler, normalize
from .state import MLAState, ModelState
from .state_io import rewind


@dataclass
class _Row:
    """One running sequence of the sequential reference: its own state, generate_step and ReplyText."""

    state: ModelState
    steps: Iterator[Step]
    reply: ReplyText
    last: Step | None = None

    def snapshot(self) -> ModelState:
        """The state holding every token fed so far but the last one yielded (generate_step computes a step
        ahead: its state already holds that token unless it was the last allowed, whose mark is None)."""
        snap = self.state.snapshot()
        if self.last is not None and self.last.mark is not None:
            rewind(snap, self.last.mark)
        return snap


@dataclass
class PausedRow:
    """A row out of the batch (BatchGenerator.pause), everything it needs to go on exactly (resume).

    Batched engine: `state` is a batch-1 ModelState holding every token fed so far (the prompt and every token
    returned), `pending` the next token (token [1], logprobs [1, V]), already drawn but not yet returned, `sample`
    the RowSampler (its Sampler key advanced past that draw; its processors' history up to the returned tokens)
    and `reply` the ReplyText (detokenizer, stop matcher, tokens). Sequential twin: `row`, the whole _Row (its
    generate_step holds the same things)."""

    seq: int
    reply: ReplyText
    state: ModelState | None = None
    pending: tuple | None = None
    sample: RowSampler | None = None
    plain: bool = False
    row: _Row | None = None

    @property
    def tokens(self) -> int:
        """Tokens its state holds."""
        return (self.row.state if self.row is not None else self.state).offset

    @property
    def nbytes(self) -> int:
        """Bytes it holds: its state (the KDA state and the MLA rows of every token fed, exactly as many) plus
        its pending draw's token and logprobs (the sequential twin: its state, pages at their capacity; its
        suspended generate_step holds the pending draw besides)."""
        if self.row is not None:
            return self.row.state.nbytes
        return self.state.nbytes + sum(a.nbytes for a in self.pending)


class _Sequential:
    """reference=True: each row alone through generate_step on its own batch-1 state."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.rows: dict[int, _Row] = {}
        self.finished: dict[int, _Row] = {}  # rows that left in the latest step (their final state stays readable)

    def add(self, seq: int, state: ModelState, last: int, opts: GenerationOptions, context: list[int],
            extra: list, prompt_seconds: float) -> None:
        mine = state.snapshot()
        max_tokens = reply_room(self.model, mine, 1, opts)
        procs, tail = sampling_context(opts, context, [last])
        procs += extra
        sampler = Sampler(opts.temperature, opts.top_p, opts.top_k, opts.min_p, opts.seed)
        steps = generate_step(self.model, mine, [last], sampler, procs, tail, max_tokens)
        reply = ReplyText(self.model, self.tokenizer, opts, max_tokens, state.offset + 1, prompt_seconds)
        self.rows[seq] = _Row(mine, steps, reply)

    def step(self) -> list[tuple[int, Response]]:
        self.finished = {}
        out = []
        for seq, row in list(self.rows.items()):
            row.last = next(row.steps)
            r = row.reply.push(row.last)
            out.append((seq, r))
            if r.finish_reason:
                row.steps.close()
                self.finished[seq] = self.rows.pop(seq)
        return out

    def remove(self, seq: int) -> bool:
        row = self.rows.pop(seq, None) or self.finished.pop(seq, None)
        if row is not None:
            row.steps.close()
        return row is not None

    def pause(self, seq: int) -> PausedRow:
        """The row as it is: its generate_step is suspended between yields (it holds the pending draw)."""
        row = self.rows.pop(seq)
        return PausedRow(seq, row.reply, row=row)

    def resume(self, paused: PausedRow) -> None:
        self.rows[paused.seq] = paused.row

    def _row(self, seq: int) -> _Row | None:
        return self.rows.get(seq) or self.finished.get(seq)

    def state(self, seq: int) -> ModelState | None:
        row = self._row(seq)
        return row and row.snapshot()

    def tokens(self, seq: int) -> list[int] | None:
        row = self._row(seq)
        return row and list(row.reply.tokens)


@dataclass
class _Slot:
    """One sequence of the batched engine: its slot in the BatchState, its sampling and its ReplyText."""

    slot: int
    reply: ReplyText
    sample: RowSampler
    plain: bool  # greedy without processors: its token is the batch's one argmax
    initial: ModelState | None  # the state it joined with (the prompt but its last token; None: resumed)
    offset: int  # tokens its slot holds
    first: tuple | None  # (token [1], logprobs [1, V]) drawn at insert, until the first step returns it
    y: mx.array | None = None  # its pending token [1], drawn by the latest step (fed by the next)
    marked: int | None = None  # its slot's tokens at the latest step's mark (None: joined since)
    final: ModelState | None = None  # its last state, once read after it finished


class _Batched:
    """The batched engine: every running sequence a slot of one BatchState, one decode step for all of them.

    A step runs one token ahead, as generate_step does: it queues the next forward (every slot fed its pending
    token) before reading the pending tokens back, so the device computes while the host builds Responses. A
    sequence that finishes has been fed one token too many by then; its slot is dropped, and its final state is
    read from the step's mark (the state before that feed)."""

    def __init__(self, model, tokenizer, max_batch: int):
        self.model, self.tokenizer = model, tokenizer
        self.batch = BatchState(model, max_batch)
        self.rows: dict[int, _Slot] = {}
        self.finished: dict[int, _Slot] = {}  # left in the latest step; their slots are held until the next
        self.mark = None  # BatchMark before the latest forward
        self.y_all = self.lp_all = None  # the latest forward's draws [C] and logprobs [C, V]

    def add(self, seq: int, state: ModelState, last: int, opts: GenerationOptions, context: list[int],
            extra: list, prompt_seconds: float, shared: dict) -> None:
        """Rows sharing one prefix (n > 1) share `shared`: the prefix state with `last` fed and its logits, computed
        once (the single-sequence one-token step)."""
        max_tokens = reply_room(self.model, state, 1, opts)
        if "logits" not in shared:
            fed = state.snapshot()
            shared["logits"] = self.model(mx.array([[last]]), fed)[:, -1]
            shared["state"] = fed
        procs, tail = sampling_context(opts, context, [last])
        procs += extra
        sample = RowSampler(Sampler(opts.temperature, opts.top_p, opts.top_k, opts.min_p, opts.seed), procs,
                            tail + [last])
        first = sample(shared["logits"])
        mx.async_eval(*first)
        self._hold_slots()
        b = self.batch.add(shared["state"])
        reply = ReplyText(self.model, self.tokenizer, opts, max_tokens, state.offset + 1, prompt_seconds)
        self.rows[seq] = _Slot(b, reply, sample, sample.sampler.greedy and not procs, state, state.offset + 1, first)

    def _hold_slots(self) -> None:
        """Before a slot may be reused: the finished rows' final states read out of it."""
        for row in self.finished.values():
            self._final(row)

    def _final(self, row: _Slot) -> ModelState:
        if row.final is None:
            row.final = self.batch.extract(row.slot, self.mark, row.marked) if row.marked is not None else row.initial
            self.batch.free(row.slot)
        return row.final

    def step(self) -> list[tuple[int, Response]]:
        for row in self.finished.values():
            if row.final is None:
                self.batch.free(row.slot)
        self.finished = {}
        rows = self.rows
        if not rows:
            return []
        if self.batch.capacity > slots_for(len(rows), self.batch.max_batch):
            # rows left: every step computes every slot, so a lone row in a batch of 8 would pay for 8 (MLX's
            # mat-vecs cost a row each). One copy of the running rows' state (a join or leave's worth: at most one
            # per row that crossed a power of two) cuts the batch back to the slots they need.
            self.compact()
        drawn, logprobs = self.y_all, self.lp_all  # the latest forward's draws: the pending tokens of rows in it
        steady = drawn is not None and drawn.shape[0] == self.batch.capacity and all(
            row.first is None for row in rows.values())
        if any(len(row.reply.tokens) + 1 < row.reply.max_tokens for row in rows.values()):
            inputs = {row.slot: row.first[0] if row.first is not None else row.y for row in rows.values()}
            self._forward(inputs, drawn if steady else None)
        else:  # every row's pending token is its last: nothing to feed
            self.mark = self.batch.mark()
            for row in rows.values():
                row.marked = row.offset
        # the pending tokens to the host: the latest draws in one read, each joined row's first draw on its own
        values = drawn.tolist() if drawn is not None and any(row.first is None for row in rows.values()) else None
        out = []
        for seq, row in list(rows.items()):
            if row.first is not None:
                (y, lp), row.first = row.first, None
                token, lp = y.item(), lp[0]
            else:
                token, lp = values[row.slot], logprobs[row.slot]
            r = row.reply.push(Step(token, lp, None))
            out.append((seq, r))
            if r.finish_reason:
                self.finished[seq] = rows.pop(seq)
        return out

    def _forward(self, inputs: dict[int, mx.array], drawn: mx.array | None) -> None:
        """One decode step of every slot, each fed its pending token (drawn: all of them, the latest step's
        draws, as one array); draws each row's next token."""
        batch = self.batch
        batch.prepare()
        C = batch.capacity
        if drawn is not None and drawn.shape[0] == C:
            tokens = drawn
        else:  # rows joined or the capacity changed: gather each slot's token (a free slot decodes token 0)
            blank = mx.zeros((1,), mx.uint32)
            tokens = mx.concatenate([inputs.get(b, blank).astype(mx.uint32) for b in range(C)])
        for row in self.rows.values():
            row.sample.fed(inputs[row.slot])
        self.mark = batch.mark()
        for row in self.rows.values():
            row.marked = row.offset
            row.offset += 1
        logits = self.model.decode_rows(tokens.reshape(C, 1), batch)[:, -1]
        batch.advance()
        lp = normalize(logits.astype(mx.float32))
        by_slot = {row.slot: row for row in self.rows.values()}
        if all(row.plain for row in by_slot.values()):
            y = mx.argmax(lp, axis=-1)
        else:  # each sampled row draws on its own (its key, its processors); the plain greedy share one argmax
            top = mx.argmax(lp, axis=-1)
            y = mx.concatenate([top[b : b + 1] if b not in by_slot or by_slot[b].plain
                                else by_slot[b].sample(logits[b : b + 1], lp[b : b + 1])[0].astype(top.dtype)
                                for b in range(C)])
        self.y_all, self.lp_all = y, lp
        for row in self.rows.values():
            row.y = y[row.slot : row.slot + 1]
        mx.async_eval(y, lp)

    def remove(self, seq: int) -> bool:
        row = self.rows.pop(seq, None) or self.finished.pop(seq, None)
        if row is not None and row.final is None:
            self.batch.free(row.slot)
        return row is not None

    def pause(self, seq: int) -> PausedRow:
        """Between steps a running row's slot holds every token fed so far (a row that joined since the latest
        step: its prompt with `last` fed), and its next token is drawn but not returned: `first` (joined since)
        or its share of the latest forward's draws (y, and its logprobs row). Its slot is read out now and
        freed; the draw is kept as it is (its sampler already advanced past it, its processors not yet fed it)."""
        row = self.rows.pop(seq)
        state = self.batch.extract(row.slot, self.batch.mark(), row.offset)
        if row.first is not None:
            pending = row.first
        else:
            pending = (row.y, self.lp_all[row.slot : row.slot + 1])
        pending = tuple(mx.contiguous(a) for a in pending)  # (not the whole batch's arrays)
        mx.eval(*pending)
        self.batch.free(row.slot)
        return PausedRow(seq, row.reply, state, pending, row.sample, row.plain)

    def compact(self) -> None:
        """The batch's occupied slots to the front, its capacity and page cut to them (BatchState.compact), the
        rows' slots and the latest draws renumbered. Finished rows' final states are read out first; a running
        row's state() is readable again after the next step (the latest mark is of the old layout)."""
        self._hold_slots()
        order = self.batch.compact()
        if order is None:
            return
        new = {old: b for b, old in enumerate(order)}
        for row in self.rows.values():
            row.slot = new[row.slot]
            if row.marked is not None:
                row.marked, row.initial = None, None
        self.mark = None
        if self.y_all is not None and order:
            n = self.y_all.shape[0]  # (slots filled since the latest forward hold rows with their own `first`)
            idx = mx.array([b if b < n else 0 for b in order] + [0] * (self.batch.capacity - len(order)), mx.int32)
            self.y_all, self.lp_all = mx.take(self.y_all, idx, axis=0), mx.take(self.lp_all, idx, axis=0)
        elif not order:
            self.y_all = self.lp_all = None

    def resume(self, paused: PausedRow) -> None:
        """The row joins a free slot as insert's rows do: its pending draw as `first` (returned by the next step,
        which feeds it), its own sampler and reply."""
        self._hold_slots()
        b = self.batch.add(paused.state)
        self.rows[paused.seq] = _Slot(b, paused.reply, paused.sample, paused.plain, None, paused.state.offset,
                                      paused.pending)

    def _row(self, seq: int) -> _Slot | None:
        return self.rows.get(seq) or self.finished.get(seq)

    def state(self, seq: int) -> ModelState | None:
        if seq in self.finished:
            return self._final(self.finished[seq]).snapshot()
        row = self.rows.get(seq)
        if row is None:
            return None
        if row.marked is None:
            if row.initial is None:  # (its state holds its last token, which state() leaves out)
                raise KimiError(f"sequence {seq} was resumed and has not stepped since: its state is readable "
                                f"after the next step")
            return row.initial.snapshot()
        return self.batch.extract(row.slot, self.mark, row.marked)

    def tokens(self, seq: int) -> list[int] | None:
        row = self._row(seq)
        return row and list(row.reply.tokens)


class BatchGenerator:
    """Decodes many sequences together; sequences join and leave between steps."""

    def __init__(self, model, tokenizer, *, max_batch: int = 8, reference: bool = False):
        """reference=True: the sequential twin (each row alone through the single-sequence decode). A model split
        over ranks (pipeline parallelism) runs the sequential engine."""
        if max_batch < 1:
            raise KimiError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.reference = reference or getattr(model, "pipeline", None) is not None
        self._engine = _Sequential(model, tokenizer) if self.reference else _Batched(model, tokenizer, max_batch)
        self._next = 0

    @property
    def running(self) -> int:
        return len(self._engine.rows)

    @property
    def free(self) -> int:
        return self.max_batch - self.running

    def insert(self, state: ModelState, last: int, options: GenerationOptions, *, context_tail: Sequence[int] = (),
               n: int = 1, processors: Sequence | Callable = (), prompt_seconds: float = 0.0) -> list[int]:
        """Join n new rows (sequence ids returned) that continue from `state`: a batch-1 state holding the prompt
        except its last token `last` (the caller prefilled it). The state is not mutated (rows take O(1)
        snapshots of it). context_tail: the prompt's tail that repetition/presence/frequency penalties look back
        on (the tokens before `last`). n > 1: n rows sharing that one prefilled prefix (`last` is fed once), each
        sampling on its own (a seeded option gives row j the seed seed + j). processors: extra logits processors
        for each row, as a list (shared by the n rows) or a callable returning a fresh list per row (for stateful
        ones); prompt_seconds: time the caller spent on the prompt (for Response.prompt_tps). Raises KimiError if
        the rows would exceed max_batch."""
        if n < 1:
            raise KimiError(f"n must be >= 1, got {n}")
        if n > self.free:
            raise KimiError(f"{n} new rows do not fit: {self.running} of max_batch {self.max_batch} are running; "
                            f"wait for rows to finish or raise max_batch")
        if state.batch_size != 1:
            raise KimiError(f"insert takes a batch-1 state, got batch {state.batch_size}")
        if options.draft:
            raise KimiError("BatchGenerator decodes without drafts: speculative rows run in spec_batch.SpecBatch "
                            "(stream_batch or batch_generate with draft='ngram'); drop the draft here")
        options.checked()
        seqs, shared = [], {}
        for j in range(n):
            extra = list(processors() if callable(processors) else processors)
            seq, self._next = self._next, self._next + 1
            args = (seq, state, last, row_options(options, j), list(context_tail), extra, prompt_seconds)
            self._engine.add(*args) if self.reference else self._engine.add(*args, shared)
            seqs.append(seq)
        return seqs

    @property
    def nbytes(self) -> int:
        """Bytes the rows' states hold now (the batched engine: its whole BatchState, pages as allocated)."""
        if self.reference:
            return sum(row.state.nbytes for row in self._engine.rows.values())
        return self._engine.batch.nbytes

    def bytes_with(self, state: ModelState, n: int = 1) -> int:
        """Bytes the rows' states would hold with n more rows continuing `state` (a server's memory bound asks
        before insert). The batched engine sizes every slot by its longest row, so this is capacity x the longest
        row, not the sum of the rows' lengths."""
        if self.reference:
            return self.nbytes + n * state.nbytes
        bits = next((s.bits for s in state.layers if isinstance(s, MLAState)), 0)
        return self._engine.batch.bytes_with(state.offset + 1, bits, n)  # (+ 1: `last`, fed at insert)

    def step(self) -> list[tuple[int, Response]]:
        """One decode step for every running row: each row's new token as the same Response the single-sequence
        Generation yields, paired with its sequence id. A row whose Response carries a finish_reason has left
        the batch after this step (state(seq) still reads its final state until the next step)."""
        return self._engine.step()

    def remove(self, seq: int) -> None:
        """Drop a row now (cancelled or disconnected); the other rows are untouched."""
        if not self._engine.remove(seq):
            raise KimiError(f"no sequence {seq} in the batch")

    def pause(self, seq: int) -> PausedRow:
        """Take a running row out of the batch (between steps), freeing its slot: the PausedRow holds everything
        it needs to go on (see PausedRow; its nbytes is what it keeps in memory). The other rows are untouched.
        The slot's memory stays the batch's until compact() (pausing several rows, compact once after)."""
        if seq not in self._engine.rows:
            raise KimiError(f"no running sequence {seq} in the batch")
        return self._engine.pause(seq)

    def compact(self) -> None:
        """Give back the memory of slots freed by pause or remove now: the running rows move to the front slots
        and the batched state's capacity and page are cut to what they need (one copy of the state, a layer at a
        time; nothing when it would not shrink). The rows' Responses are unchanged. A running row's state() is
        readable again after the next step."""
        if not self.reference:
            self._engine.compact()

    @property
    def layout(self) -> tuple[int, int]:
        """(slots, MLA page rows) the batched state holds now ((0, 0): none, or the sequential twin)."""
        if self.reference:
            return 0, 0
        return self._engine.batch.capacity, self._engine.batch.rows

    def resume(self, paused: PausedRow) -> int:
        """Put a paused row back into a free slot (any: slots are not the row's identity); it keeps its sequence
        id, returned. The next step returns exactly the Response the row would have returned had it never left
        (its tokens, text, logprobs and finish). Raises KimiError if no row is free."""
        if self.free < 1:
            raise KimiError(f"no free row to resume sequence {paused.seq}: {self.running} of max_batch "
                            f"{self.max_batch} are running")
        if (paused.row is not None) != self.reference or paused.seq in self._engine.rows:
            raise KimiError(f"sequence {paused.seq} was not paused by this batch")
        self._engine.resume(paused)
        return paused.seq

    def state(self, seq: int) -> ModelState:
        """A batch-1 snapshot of a row's state: the prompt and every generated token but the last (which, as
        insert's `last`, is the next to feed). Rows that finished in the latest step stay readable until the
        next step; a row resumed since the latest step is readable after the next one (a paused row: its
        PausedRow.state holds every token fed, its pending one not among them)."""
        state = self._engine.state(seq)
        if state is None:
            raise KimiError(f"no sequence {seq} in the batch")
        return state

    def tokens(self, seq: int) -> list[int]:
        """The tokens this row has generated so far."""
        tokens = self._engine.tokens(seq)
        if tokens is None:
            raise KimiError(f"no sequence {seq} in the batch")
        return tokens


def stream_batch(model, tokenizer, prompts, *, max_batch: int = 8, n: int = 1, reference: bool = False,
                 tools=None, allow_special: bool = False, **options) -> Iterator[tuple[int, Response]]:
    """Generate for every prompt (strings, token lists or message lists, of any lengths), max_batch rows at a
    time: each prompt is prefilled alone and joins the batch as rows free up. Yields (id, Response) per token;
    id = prompt index * n + j for the j-th of n samples of a prompt (a seeded option gives sample j the seed
    seed + j). With draft='ngram' every row decodes speculatively (spec_batch.py); a draft model drafts for one
    sequence at a time and is refused here."""
    opts = GenerationOptions.from_kwargs(**options)
    if n < 1 or n > max_batch:
        raise KimiError(f"n must be between 1 and max_batch ({max_batch}), got {n}")
    ids = [prompt_ids(tokenizer, p, tools, allow_special, model.config.vocab_size) for p in prompts]
    for i, p in enumerate(ids):
        if not p:
            raise KimiError(f"prompt {i} is empty: give at least one token")
    if opts.draft:  # every row drafts by prompt lookup, one forward verifies them all (spec_batch.py)
        from .spec_batch import SpecBatch, check_draft

        check_draft(opts)
        if reference:
            raise KimiError("the sequential reference decodes without drafts; drop the draft or reference")
        gen = SpecBatch(model, tokenizer, max_batch)
    else:
        gen = BatchGenerator(model, tokenizer, max_batch=max_batch, reference=reference)
    names: dict[int, int] = {}
    waiting = list(range(len(ids)))
    while waiting or gen.running:
        while waiting and gen.free >= n:
            i = waiting.pop(0)
            t0 = time.perf_counter()
            state = model.new_state(1)
            prefill(model, state, ids[i][:-1], opts.prefill_step_size)
            for j, seq in enumerate(gen.insert(state, ids[i][-1], opts, context_tail=ids[i][:-1], n=n,
                                               prompt_seconds=time.perf_counter() - t0)):
                names[seq] = i * n + j
        for seq, r in gen.step():
            yield names[seq], r


def batch_generate(model, tokenizer, prompts, **options) -> list[str]:
    """The generated text for every prompt (stop strings and stop tokens excluded), decoded as one batch;
    with n > 1, n texts per prompt (prompt i's samples at i*n ... i*n + n-1)."""
    prompts = list(prompts)
    texts = [""] * (len(prompts) * options.get("n", 1))
    for i, r in stream_batch(model, tokenizer, prompts, **options):
        texts[i] += r.text
    return texts
