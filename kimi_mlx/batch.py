"""Many sequences at once: BatchGenerator decodes a batch of rows together; rows join (insert) and leave
(finish, remove) between steps. batch_generate and stream_batch run a list of prompts through it.

Invariant: a row's Responses are the same whatever else is in the batch. Each row keeps its own sampling
(RowSampler: its own processors and Sampler key, so a seeded row draws the same stream alone or batched) and its
own ReplyText (text, stop strings, finish reason, timings), both shared with the single-sequence Generation.

reference=True is the sequential twin: every row holds its own batch-1 ModelState and is stepped alone through
generate_step, the single-sequence decode. It is what the batched engine is tested against.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import mlx.core as mx

from .errors import KimiError
from .generate import (GenerationOptions, ReplyText, Response, Step, generate_step, prefill, prompt_ids,
                       reply_room, sampling_context)
from .sample import Sampler
from .state import ModelState
from .state_io import rewind


def row_options(opts: GenerationOptions, j: int) -> GenerationOptions:
    """Row j's options of n sharing one prompt: a seeded option gives row j the seed seed + j."""
    if opts.seed is None or j == 0:
        return opts
    return opts.updated(seed=opts.seed + j)


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


class BatchGenerator:
    """Decodes many sequences together; sequences join and leave between steps."""

    def __init__(self, model, tokenizer, *, max_batch: int = 8, reference: bool = False):
        """reference=True: the sequential twin (each row alone through the single-sequence decode)."""
        if max_batch < 1:
            raise KimiError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.tokenizer, self.max_batch, self.reference = model, tokenizer, max_batch, reference
        self._rows: dict[int, _Row] = {}
        self._finished: dict[int, _Row] = {}  # rows that left in the latest step (their final state stays readable)
        self._next = 0

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def free(self) -> int:
        return self.max_batch - self.running

    def insert(self, state: ModelState, last: int, options: GenerationOptions, *, context_tail: Sequence[int] = (),
               n: int = 1, processors: Sequence = (), prompt_seconds: float = 0.0) -> list[int]:
        """Join n new rows (sequence ids returned) that continue from `state`: a batch-1 state holding the prompt
        except its last token `last` (the caller prefilled it). The state is not mutated (rows take O(1)
        snapshots of it). context_tail: the prompt's tail that repetition/presence/frequency penalties look back
        on (the tokens before `last`). n > 1: n rows sharing that one prefilled prefix, each sampling on its own
        (a seeded option gives row j the seed seed + j). processors: extra logits processors per row (each row
        gets its own list: a factory `lambda: [...]` may be given for stateful ones); prompt_seconds: time the
        caller spent on the prompt (for Response.prompt_tps). Raises KimiError if the rows would exceed
        max_batch."""
        if n < 1:
            raise KimiError(f"n must be >= 1, got {n}")
        if n > self.free:
            raise KimiError(f"{n} new rows do not fit: {self.running} of max_batch {self.max_batch} are running; "
                            f"wait for rows to finish or raise max_batch")
        if state.batch_size != 1:
            raise KimiError(f"insert takes a batch-1 state, got batch {state.batch_size}")
        options.checked()
        seqs = []
        for j in range(n):
            opts = row_options(options, j)
            extra = list(processors() if callable(processors) else processors)
            seq, self._next = self._next, self._next + 1
            self._rows[seq] = self._new_row(state, last, opts, list(context_tail), extra, prompt_seconds)
            seqs.append(seq)
        return seqs

    def _new_row(self, state: ModelState, last: int, opts: GenerationOptions, context: list[int], extra: list,
                 prompt_seconds: float) -> _Row:
        mine = state.snapshot()
        max_tokens = reply_room(self.model, mine, 1, opts)
        procs, tail = sampling_context(opts, context, [last])
        procs += extra
        sampler = Sampler(opts.temperature, opts.top_p, opts.top_k, opts.min_p, opts.seed)
        steps = generate_step(self.model, mine, [last], sampler, procs, tail, max_tokens)
        reply = ReplyText(self.model, self.tokenizer, opts, max_tokens, state.offset + 1, prompt_seconds)
        return _Row(mine, steps, reply)

    def step(self) -> list[tuple[int, Response]]:
        """One decode step for every running row: each row's new token as the same Response the single-sequence
        Generation yields, paired with its sequence id. A row whose Response carries a finish_reason has left
        the batch after this step (state(seq) still reads its final state until the next step)."""
        self._finished = {}
        out = []
        for seq, row in list(self._rows.items()):
            row.last = next(row.steps)
            r = row.reply.push(row.last)
            out.append((seq, r))
            if r.finish_reason:
                row.steps.close()
                self._finished[seq] = self._rows.pop(seq)
        return out

    def remove(self, seq: int) -> None:
        """Drop a row now (cancelled or disconnected); the other rows are untouched."""
        row = self._rows.pop(seq, None) or self._finished.pop(seq, None)
        if row is None:
            raise KimiError(f"no sequence {seq} in the batch")
        row.steps.close()

    def _row(self, seq: int) -> _Row:
        row = self._rows.get(seq) or self._finished.get(seq)
        if row is None:
            raise KimiError(f"no sequence {seq} in the batch")
        return row

    def state(self, seq: int) -> ModelState:
        """A batch-1 snapshot of a row's state: the prompt and every generated token but the last (which, as
        insert's `last`, is the next to feed). Rows that finished in the latest step stay readable until the
        next step."""
        return self._row(seq).snapshot()

    def tokens(self, seq: int) -> list[int]:
        """The tokens this row has generated so far."""
        return list(self._row(seq).reply.tokens)


def stream_batch(model, tokenizer, prompts, *, max_batch: int = 8, n: int = 1, reference: bool = False,
                 tools=None, allow_special: bool = False, **options) -> Iterator[tuple[int, Response]]:
    """Generate for every prompt (strings, token lists or message lists, of any lengths), max_batch rows at a
    time: each prompt is prefilled alone and joins the batch as rows free up. Yields (id, Response) per token;
    id = prompt index * n + j for the j-th of n samples of a prompt (a seeded option gives sample j the seed
    seed + j)."""
    opts = GenerationOptions.from_kwargs(**options)
    if n < 1 or n > max_batch:
        raise KimiError(f"n must be between 1 and max_batch ({max_batch}), got {n}")
    ids = [prompt_ids(tokenizer, p, tools, allow_special) for p in prompts]
    for i, p in enumerate(ids):
        if not p:
            raise KimiError(f"prompt {i} is empty: give at least one token")
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
