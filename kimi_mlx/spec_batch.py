"""Speculative decoding for many sequences at once: every row drafts by prompt lookup, and one forward verifies
every row's drafts together.

A round (SpecBatch.step): each running row returns its pending token y (drawn by the round before) and drafts up
to k tokens continuing it, with its own NgramDraft and DraftWidth as a single sequence's speculative_steps does.
One forward feeds every slot T = 1 + the most drafts any row made (model/verify.verify_batch); a row with fewer is
padded, and its padding rows are computed and never kept. Each row keeps the drafts its own target distribution
accepts (speculate._decide: the same acceptance rule) and draws its next pending token from the row after them;
its slot then keeps the state after those rows (BatchState.keep). A round in which no row drafts is a plain
batched decode step (model.decode_rows).

Invariant: a row's tokens are those plain decoding gives it (temperature 0: the same tokens; sampling: the same
distribution), whatever else runs beside it. A row's widths depend on its own tokens and the batch's max_batch,
never on the other rows, so a seeded row draws the same stream in any company.

Unlike the plain batched engine (batch.py), a round reads its drafts' verdicts before it can queue the next
forward, so the host does not build the next step while the device runs this one.

Bound: a verification holds the KDA state after each of its T rows for each of the C slots (transient, T x C x one
sequence's KDA state); MAX_ROWS bounds T x max_batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from .batch_state import BatchState, slots_for
from .errors import KimiError
from .feed import Step
from .generate import GenerationOptions, ReplyText, Response, reply_room, sampling_context
from .model.verify import MAX_VERIFY, verify_batch
from .sample import Sampler, normalize
from .speculate import NGRAM, NUM_DRAFT, DraftWidth, NgramDraft, SpecStats, _decide
from .state import ModelState

MAX_ROWS = 64  # a verification's slots x rows at most (each row's KDA state is held until the rows are decided)


def check_draft(opts: GenerationOptions) -> None:
    if opts.draft != NGRAM:
        raise KimiError("a batch drafts by prompt lookup only (draft='ngram'); a draft model drafts for one "
                        "sequence at a time (generate, chat)")


@dataclass
class _Row:
    slot: int
    reply: ReplyText
    sampler: Sampler
    processors: list
    context: list[int]  # the penalties' token context: the prompt's tail and every token returned so far
    draft: NgramDraft
    width: DraftWidth
    stats: SpecStats
    y: int  # the pending token: drawn, not yet returned or fed
    lp: mx.array  # its raw logprobs [V]
    n: int = 1  # y is the reply's n-th token


def _drawn(row: _Row, logits: mx.array, extra: list[int]) -> tuple[mx.array, mx.array]:
    """(raw logprobs [V], the logprobs a draw is made from [1, V]) of one logits row [V] after the row's context
    and `extra` tokens (speculative_steps's drawn_row)."""
    lp = normalize(logits.astype(mx.float32))[None]
    if not row.processors:
        return lp[0], lp
    toks, lg = mx.array(row.context + extra), logits[None]
    for p in row.processors:
        lg = p(toks, lg)
    return lp[0], normalize(lg.astype(mx.float32))


class SpecBatch:
    """Rows of prompt-lookup speculative decoding in one ragged batch (see the module docstring)."""

    def __init__(self, model, tokenizer, max_batch: int = 8):
        if max_batch < 1:
            raise KimiError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.batch = BatchState(model, max_batch)
        self.rows: dict[int, _Row] = {}
        self.most = max(1, min(MAX_VERIFY, MAX_ROWS // max_batch) - 1)  # drafts a row may make a round
        self._next = 0

    @property
    def running(self) -> int:
        return len(self.rows)

    @property
    def free(self) -> int:
        return self.max_batch - self.running

    def insert(self, state: ModelState, prompt: list[int], options: GenerationOptions, *, n: int = 1,
               prompt_seconds: float = 0.0) -> list[int]:
        """Join n rows continuing `state`, a batch-1 state holding prompt[:-1] (the caller prefilled it; it is not
        mutated). Each row drafts from the whole prompt; a seeded option gives row j the seed seed + j."""
        from .batch import row_options

        check_draft(options)
        if n > self.free:
            raise KimiError(f"{n} new rows do not fit: {self.running} of max_batch {self.max_batch} are running")
        options.checked()
        last = prompt[-1]
        fed = state.snapshot()
        logits = self.model(mx.array([[last]]), fed)[0, -1]
        seqs = []
        for j in range(n):
            opts = row_options(options, j)
            procs, tail = sampling_context(opts, prompt[:-1], [last])
            reply = ReplyText(self.model, self.tokenizer, opts, reply_room(self.model, state, 1, opts),
                              state.offset + 1, prompt_seconds)
            reply.spec = SpecStats()
            draft = NgramDraft(opts.num_draft or NUM_DRAFT, opts.ngram)
            draft.extend(prompt)
            sampler = Sampler(opts.temperature, opts.top_p, opts.top_k, opts.min_p, opts.seed)
            row = _Row(-1, reply, sampler, procs, tail + [last], draft, DraftWidth(), reply.spec, 0, None)
            lp, drawn = _drawn(row, logits, [])
            row.y, row.lp = sampler(drawn).item(), lp
            row.slot = self.batch.add(fed)
            seq, self._next = self._next, self._next + 1
            self.rows[seq] = row
            seqs.append(seq)
        return seqs

    def step(self) -> list[tuple[int, Response]]:
        """One round of every running row: its pending token and the drafts the verification kept, as the same
        Responses a single sequence's speculative Generation yields (a row's Responses in order). A row whose
        last Response carries a finish_reason has left. The round's forward is queued before the pending tokens'
        Responses are made, so the host detokenizes while the device computes."""
        out = []
        plan = {}  # seq -> (drafts, prompt lookup's guess at the next token where it drafted none)
        for seq, row in list(self.rows.items()):
            if row.n >= row.reply.max_tokens or row.y in row.reply.stops:  # y is its last token: nothing to feed
                out.append((seq, row.reply.push(Step(row.y, row.lp, None))))
                self._leave(seq)
                continue
            row.draft.extend([row.y])
            k = min(row.width.width(min(row.draft.num_draft, self.most)), row.reply.max_tokens - 1 - row.n)
            drafts = row.draft.propose(k) if k > 0 else []
            cut = next((i for i, d in enumerate(drafts) if d in row.reply.stops), None)
            if cut is not None:  # nothing after a stop token counts
                drafts = drafts[: cut + 1]
            guess = None if drafts else row.draft.propose(1)
            plan[seq] = (drafts, guess[0] if guess else None)
        if not self.rows:
            return out
        if self.batch.capacity > slots_for(len(self.rows), self.max_batch):
            self._compact()  # every round computes every slot: cut idle ones off (batch.py's _Batched.step)
        T = 1 + max(len(d) for d, _ in plan.values())
        C = self.batch.capacity
        tokens = [[0] * T for _ in range(C)]
        for seq, row in self.rows.items():
            drafts = plan[seq][0]
            tokens[row.slot] = [row.y] + drafts + [row.y] * (T - 1 - len(drafts))
        if T == 1:
            self.batch.prepare()
            logits = self.model.decode_rows(mx.array(tokens, mx.uint32), self.batch)
            self.batch.advance()
            after = None
        else:
            logits, after = verify_batch(self.model, mx.array(tokens, mx.uint32), self.batch)
        mx.async_eval(logits)
        for seq, row in list(self.rows.items()):
            r = row.reply.push(Step(row.y, row.lp, None))
            out.append((seq, r))
            if r.finish_reason:  # a stop string: its slot's rows are computed and dropped
                self._leave(seq)
        kept = [1] * C
        decided = {}
        for seq, row in self.rows.items():
            drafts, guess = plan[seq]
            K = len(drafts)
            rows = [_drawn(row, logits[row.slot, i], [row.y] + drafts[:i]) for i in range(K + 1)]
            drawn = mx.concatenate([d for _, d in rows]) if row.processors else mx.stack([lp for lp, _ in rows])
            accepted, nxt = _decide(row.sampler, drawn, drafts, None)
            kept[row.slot] = accepted + 1
            decided[seq] = (accepted, nxt, rows)
        if after is not None:
            self.batch.keep(kept, after)
        for seq, (accepted, nxt, rows) in decided.items():
            row = self.rows[seq]
            drafts, guess = plan[seq]
            if drafts:
                for i in range(min(accepted + 1, len(drafts))):  # the kept ones, then the first rejected
                    row.width.observe(i < accepted)
            elif guess is not None:
                row.width.observe(guess == nxt)
            row.stats.forwards += 1
            row.stats.drafted += len(drafts)
            row.stats.accepted += accepted
            row.stats.tokens += accepted + 1
            for i in range(accepted):
                r = row.reply.push(Step(drafts[i], rows[i][0], None, True))
                out.append((seq, r))
                if r.finish_reason:
                    self._leave(seq)
                    break
            else:
                row.context += [row.y] + drafts[:accepted]
                row.draft.extend(drafts[:accepted])
                row.y, row.lp, row.n = nxt, rows[accepted][0], row.n + accepted + 1
        return out

    def remove(self, seq: int) -> None:
        """Drop a row now (cancelled); the other rows are untouched."""
        if seq not in self.rows:
            raise KimiError(f"no sequence {seq} in the batch")
        self._leave(seq)

    def _leave(self, seq: int) -> None:
        self.batch.free(self.rows.pop(seq).slot)

    def _compact(self) -> None:
        order = self.batch.compact()
        if order:
            new = {old: b for b, old in enumerate(order)}
            for row in self.rows.values():
                row.slot = new[row.slot]
