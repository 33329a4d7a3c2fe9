"""Speculative decoding for many sequences at once: every row drafts by prompt lookup, and one forward verifies
every row's drafts together.

Each row keeps its own NgramDraft and DraftWidth, as a single sequence's speculative_steps does. A round
(SpecBatch.step) is one forward of every slot, of one of two kinds:
  verification  some row may draft (it drafted in the round before, or prompt lookup guessed its pending token and
                its width says drafting pays: speculative_steps's rule for leaving a plain run): the pending tokens
                are read, those rows draft, and every slot is fed T = 1 + the most drafts any row made (model/
                verify.verify_batch; a row with fewer is padded, its padding rows computed and never kept, and a
                row that may not draft takes a plain step in it). Each row keeps the drafts its own target
                distribution accepts (speculate._decide: the same acceptance rule) and draws its next pending
                token from the row after them; its slot keeps the state after those rows (BatchState.keep).
  plain         no row may draft: a batched decode step (model.decode_rows) queued before the pending tokens it
                feeds are read back, as the plain engine's (batch.py) is, so the host returns the tokens and
                builds the next step while the device computes.

Invariant: a row's tokens are those plain decoding gives it (temperature 0: the same tokens; sampling: the same
distribution). Whether and how much a row drafts depends only on its own text, its own estimate and the batch's
max_batch, so a seeded row draws the same stream whatever rows run beside it.

Bound: a verification holds the KDA state after each of its T rows for each of the C slots (transient, T x C x one
sequence's KDA state); MAX_ROWS bounds T x max_batch (a row drafts at least one token a round whatever the batch,
so above 32 rows T x max_batch can reach 2 x max_batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx

from .batch_state import BatchState, slots_for
from .errors import KimiError
from .feed import Step
from .generate import GenerationOptions, ReplyText, Response, reply_room, row_options, sampling_context
from .model.verify import MAX_VERIFY, verify_batch
from .sample import Sampler, normalize
from .speculate import NGRAM, NUM_DRAFT, DraftWidth, NgramDraft, SpecStats, _decide, device_kind
from .state import ModelState

MAX_ROWS = 64  # a verification's slots x rows at most (each row's KDA state is held until the rows are decided)
# (fixed, per row): a batched verification of k drafts a slot costs about 1 + fixed + per_row k batched steps.
# On a CPU each row costs about a step at any batch. On a GPU the decode expert kernels take each (row, expert)
# pair as its own product, so each of a batch's C x T rows adds its eight experts' work: a row costs more than
# speculate.VERIFY_COST's one-sequence figure. Fitted to
# benchmarks/speculative.py --batch (RESULTS.md).
BATCH_COST = {"cpu": (0.0, 0.93), "gpu": (0.5, 0.37)}


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
    y: int | None  # the pending token (drawn, not yet returned), None while it is only on the device (plain rounds)
    lp: mx.array  # its raw logprobs [V]
    guess: int | None = None  # prompt lookup's guess at the pending token, checked when it is taken (DraftWidth)
    eligible: bool = True  # may draft in the next round: it drafted in the last, or its guess and width say so


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
        self.y_all = None  # the latest plain round's draws [C] (each slot's pending token), on the device
        self._next = 0

    @property
    def running(self) -> int:
        return len(self.rows)

    @property
    def free(self) -> int:
        return self.max_batch - self.running

    def insert(self, state: ModelState, last: int, options: GenerationOptions, *, context_tail: Sequence[int] = (),
               n: int = 1, prompt_seconds: float = 0.0) -> list[int]:
        """Join n rows continuing `state`, a batch-1 state holding the prompt but its last token `last` (the caller
        prefilled it; it is not mutated), as BatchGenerator.insert takes them. context_tail: the tokens before
        `last`, which the penalties look back on and prompt lookup searches (give the whole prompt for the best
        drafts). A seeded option gives row j the seed seed + j."""
        check_draft(options)
        prompt = [*context_tail, last]
        if n > self.free:
            raise KimiError(f"{n} new rows do not fit: {self.running} of max_batch {self.max_batch} are running")
        options.checked()
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
            fixed, per_row = BATCH_COST[device_kind()]
            row = _Row(-1, reply, sampler, procs, tail + [last], draft, DraftWidth(per_row, fixed), reply.spec, None,
                       None)
            lp, drawn = _drawn(row, logits, [])
            row.y, row.lp = sampler(drawn).item(), lp
            row.slot = self.batch.add(fed)
            seq, self._next = self._next, self._next + 1
            self.rows[seq] = row
            seqs.append(seq)
        return seqs

    def step(self) -> list[tuple[int, Response]]:
        """One round of every running row (see the module docstring): its pending token and the drafts the round
        kept, as the same Responses a single sequence's speculative Generation yields (a row's Responses in
        order). A row whose last Response carries a finish_reason has left."""
        rows = self.rows
        if not rows:
            return []
        if any(row.y is None and (row.eligible or row.processors) for row in rows.values()):
            self._read()  # drafting, and a row's penalties, need its pending token on the host
        if self.batch.capacity > slots_for(len(rows), self.max_batch):
            self._read()  # (compaction renumbers the slots: the pending tokens come off the device first)
            self._compact()  # every round computes every slot: cut idle ones off (batch.py's _Batched.step)
        if all(len(row.reply.tokens) + 1 >= row.reply.max_tokens for row in rows.values()):
            self._read()  # every pending token is its row's last (each row finishes on it): nothing to feed
            return self._take_pending()
        if any(row.eligible for row in rows.values()):
            return self._verification()
        return self._plain()

    def _take(self, row: _Row, token: int, lp: mx.array, from_draft: bool = False) -> Response:
        """The row returns `token`: its Response; the token joins the row's penalty context and prompt lookup's
        text, and prompt lookup guesses the token after it (checked against the width's estimate when that one
        is taken)."""
        if row.guess is not None:
            row.width.observe(row.guess == token)
        r = row.reply.push(Step(token, lp, None, from_draft))
        row.context.append(token)
        row.draft.extend([token])
        guess = row.draft.propose(1)
        row.guess = guess[0] if guess else None
        return r

    def _take_pending(self) -> list[tuple[int, Response]]:
        """Every row returns its pending token (on the host); a row that finishes on it leaves."""
        out = []
        for seq, row in list(self.rows.items()):
            r = self._take(row, row.y, row.lp)
            out.append((seq, r))
            if r.finish_reason:
                self._leave(seq)
        return out

    def _read(self) -> None:
        """The pending tokens of the latest plain round to the host (one read)."""
        waiting = [row for row in self.rows.values() if row.y is None]
        if waiting:
            values = self.y_all.tolist()
            for row in waiting:
                row.y = values[row.slot]

    def _plain(self) -> list[tuple[int, Response]]:
        """A batched decode step of every slot, each fed its pending token (from the host, or the latest plain
        round's draws on the device), queued before those tokens are read and returned."""
        batch = self.batch
        batch.prepare()  # (it may shrink the capacity where rows left: the tokens are laid out after it)
        C = batch.capacity
        if all(row.y is None for row in self.rows.values()) and self.y_all.shape[0] == C:
            tokens = self.y_all
        else:
            blank = mx.zeros((1,), mx.uint32)
            by_slot = {row.slot: row for row in self.rows.values()}
            tokens = mx.concatenate([blank if b not in by_slot else mx.array([by_slot[b].y], mx.uint32)
                                     if by_slot[b].y is not None else self.y_all[b : b + 1].astype(mx.uint32)
                                     for b in range(C)])
        logits = self.model.decode_rows(tokens.reshape(C, 1), batch)[:, -1]
        batch.advance()
        lp = normalize(logits.astype(mx.float32))
        top = mx.argmax(lp, axis=-1)
        draws = {}
        for row in self.rows.values():
            if row.processors:  # (its pending token is on the host: step() read it)
                draws[row.slot] = row.sampler(_drawn(row, logits[row.slot], [row.y])[1])
            elif not row.sampler.greedy:
                draws[row.slot] = row.sampler(lp[row.slot : row.slot + 1])
        y = top if not draws else mx.concatenate([draws[b].astype(top.dtype) if b in draws else top[b : b + 1]
                                                  for b in range(C)])
        mx.async_eval(y, lp)
        self._read()
        out = self._take_pending()
        for row in self.rows.values():
            row.y, row.lp = None, lp[row.slot]
            row.stats.forwards += 1
            row.stats.tokens += 1
            row.eligible = row.guess is not None and row.width.width(self._most(row)) > 0
        self.y_all = y
        return out

    def _most(self, row: _Row) -> int:
        return min(row.draft.num_draft, self.most)

    def _verification(self) -> list[tuple[int, Response]]:
        """Every row returns its pending token (read), the eligible ones draft, and one forward verifies every
        slot's drafts (a row without any takes a plain step in it)."""
        out, plan = self._take_pending(), {}
        for seq, row in self.rows.items():
            drafts = []
            if row.eligible:
                k = min(row.width.width(self._most(row)), row.reply.max_tokens - 1 - len(row.reply.tokens))
                drafts = row.draft.propose(k) if k > 0 else []
                cut = next((i for i, d in enumerate(drafts) if d in row.reply.stops), None)
                if cut is not None:  # nothing after a stop token counts
                    drafts = drafts[: cut + 1]
            plan[seq] = drafts
        if not self.rows:
            return out
        T = 1 + max(len(d) for d in plan.values())
        self.batch.prepare(T)  # (it may shrink the capacity where rows left: the tokens are laid out after it)
        C = self.batch.capacity
        tokens = [[0] * T for _ in range(C)]
        for seq, row in self.rows.items():
            drafts = plan[seq]
            tokens[row.slot] = [row.y] + drafts + [row.y] * (T - 1 - len(drafts))
        if T == 1:
            logits = self.model.decode_rows(mx.array(tokens, mx.uint32), self.batch)
            self.batch.advance()
            after = None
        else:
            logits, after = verify_batch(self.model, mx.array(tokens, mx.uint32), self.batch)
        kept = [1] * C
        decided = {}
        for seq, row in self.rows.items():
            drafts = plan[seq]
            K = len(drafts)
            rows = [_drawn(row, logits[row.slot, i], drafts[:i]) for i in range(K + 1)]
            drawn = mx.concatenate([d for _, d in rows]) if row.processors else mx.stack([lp for lp, _ in rows])
            accepted, nxt = _decide(row.sampler, drawn, drafts, None)
            kept[row.slot] = accepted + 1
            decided[seq] = (accepted, nxt, rows)
        if after is not None:
            self.batch.keep(kept, after)
        for seq, (accepted, nxt, rows) in decided.items():
            row = self.rows[seq]
            drafts = plan[seq]
            row.stats.forwards += 1
            row.stats.tokens += accepted + 1
            if drafts:
                row.stats.drafted += len(drafts)
                row.stats.accepted += accepted
                for i in range(min(accepted + 1, len(drafts))):  # the kept ones, then the first rejected
                    row.width.observe(i < accepted)
            for i in range(accepted):
                row.guess = None  # (the drafts' verdicts are their check)
                r = self._take(row, drafts[i], rows[i][0], True)
                out.append((seq, r))
                if r.finish_reason:
                    self._leave(seq)
                    break
            else:
                row.y, row.lp = nxt, rows[accepted][0]
                if drafts:
                    row.guess, row.eligible = None, True
                else:
                    row.eligible = row.guess is not None and row.width.width(self._most(row)) > 0
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
