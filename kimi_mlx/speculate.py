"""Speculative decoding: guess a few tokens, check them in one forward, keep those the model agrees with.

Drafts (`draft` generation option):
  "ngram"  prompt lookup: the longest suffix of the text so far (up to `ngram` tokens) that occurred before,
           and the `num_draft` tokens that followed it then (NgramDraft); no second model
  PATH     a draft model with the same vocabulary (ModelDraft), its own state kept in step with the target's

A round (speculative_steps): the state holds every committed token but the pending one y (sampled, not yet
fed). The drafts d1..dk continue y; one verification forward feeds [y, d1..dk] (model/verify.py: computed
row for row as decode computes it) and gives the target's distribution after each of them. The drafts are
accepted left to right by the rule below; at the first rejection (or after all k, the bonus row) a token is
drawn from the target and becomes the next pending token. The state is rewound in O(1) to the last accepted
row (state_io.rewind of the mark verify_forward returned after it): KDA conv and recurrent arrays, MLA cache
lengths, offset. The penalties' token context grows with the accepted tokens only.

Acceptance (standard speculative sampling, so the output distribution is the target's): with p the target's
sampling distribution at that row (penalties, temperature, top-k/p, min-p applied) and q the draft's,
accept d with probability min(1, p(d) / q(d)); on rejection draw from normalize(max(0, p - q)). The n-gram
draft is deterministic, q a point mass on d: accept with probability p(d), else draw from p without d. At
temperature 0 p is a point mass on the argmax, so the tokens are plain decoding's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import mlx.core as mx

from . import settings
from .errors import KimiError
from .feed import Step, prefill
from .model.verify import MAX_VERIFY, verify_forward
from .sample import Sampler, normalize
from .state_io import mark, rewind

NGRAM = "ngram"
NUM_DRAFT = 8  # drafted tokens a round (benchmarks/speculative.py measures the choice)
NGRAM_SIZE = 3  # longest suffix prompt lookup matches (it falls back to shorter ones down to MIN_MATCH)
MIN_MATCH = 2  # shortest suffix prompt lookup trusts (an ngram of 1 allows 1)
MODEL_NUM_DRAFT = 4  # drafted tokens a round for a draft model (each costs a draft forward)
# (fixed, per row): a verification of T tokens costs about 1 + fixed + per_row * (T - 1) decode steps. On a CPU
# MLX's matmuls take each row at about the cost of one, so a row costs most of a step. On a GPU a step is bound by
# the host and a row adds mostly the reads of the experts it routes to, but a verification of even two tokens
# costs well over a step. Both fitted to benchmarks/speculative.py's verification table at the full shape
# (RESULTS.md).
VERIFY_COST = {"cpu": (0.0, 0.85), "gpu": (0.55, 0.19)}
MIN_GAIN = 1.05  # draft only where a round's expected tokens per unit of cost beat plain decoding's by this much
ACCEPT_PRIOR = 0.5  # the acceptance estimate before any guess was checked
ACCEPT_WEIGHT = 0.1  # the weight of each checked guess in the running acceptance estimate
WIDTH_ENV = "KIMI_MLX_DRAFT_WIDTH"


def device_kind() -> str:
    """The key of the cost tables (VERIFY_COST, spec_batch.BATCH_COST) for the default device: 'cpu' or 'gpu'."""
    return "cpu" if mx.default_device() == mx.cpu else "gpu"


@dataclass
class SpecStats:
    """Counts of one generation's speculation."""

    drafted: int = 0  # draft tokens verified
    accepted: int = 0  # ... of them kept
    forwards: int = 0  # target forwards after the prompt (verifications and plain steps)
    tokens: int = 0  # tokens those forwards produced

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / self.forwards if self.forwards else 0.0

    def line(self) -> str:
        rate = f" ({100 * self.accepted / self.drafted:.0f}%)" if self.drafted else ""
        return (f"draft: {self.drafted} drafted, {self.accepted} accepted{rate}, "
                f"{self.tokens_per_forward:.2f} tokens/forward")


class NgramDraft:
    """Prompt lookup over a growing token list: the tokens that followed the latest earlier occurrence of the
    list's longest matching suffix (ngram tokens down to MIN_MATCH). An index per n-gram size maps each n-gram to
    where its latest continuation starts, updated as tokens are appended (O(ngram) a token)."""

    def __init__(self, num_draft: int = NUM_DRAFT, ngram: int = NGRAM_SIZE):
        self.num_draft, self.ngram = num_draft, ngram
        self.tokens: list[int] = []
        self.index: list[dict] = [{} for _ in range(ngram + 1)]

    def extend(self, tokens) -> None:
        start = len(self.tokens)
        self.tokens.extend(tokens)
        toks, end = self.tokens, len(self.tokens)
        for n in range(1, self.ngram + 1):
            # each new position p continues the n-gram toks[p - n : p]; a later p overwrites an earlier one (the
            # latest occurrence wins), in C loops (a 100k-token context in ~0.1 s on this CPU)
            lo = max(start, n)
            grams = zip(*(toks[lo - n + i : end - n + i] for i in range(n)))
            self.index[n].update(zip(grams, range(lo, end)))

    def propose(self, k: int) -> list[int]:
        """Up to k tokens continuing self.tokens ([] when no suffix of MIN_MATCH tokens or more occurred before:
        a one-token match guesses little better than chance, and a rejected draft costs a wider forward)."""
        toks = self.tokens
        for n in range(min(self.ngram, len(toks)), min(MIN_MATCH, self.ngram) - 1, -1):
            at = self.index[n].get(tuple(toks[-n:]))
            if at is not None:
                out = toks[at : at + k]
                while len(out) < k:  # the match runs into the end: the repetition continues itself
                    out.append(out[len(out) - (len(toks) - at)] if len(toks) - at <= len(out) else toks[at + len(out)])
                return out
        return []


class DraftWidth:
    """How many tokens prompt lookup drafts a round. With a per-token acceptance a, a round of k drafts yields
    (1 - a^(k+1)) / (1 - a) tokens (the accepted run and the token drawn after it) for a verification costing
    1 + f + c k decode steps (f, c: VERIFY_COST on this device; a batch passes its own, spec_batch.BATCH_COST); the
    width is the k <= most with the best ratio, or 0 (plain steps) where none beats plain decoding's 1 by MIN_GAIN.
    a is a running estimate over every guess checked: each drafted token verified, and during plain steps prompt
    lookup's guess at the next token against the token decoded (free: no forward). The width depends only on the tokens and the device kind, so a seeded run
    repeats itself; the tokens are plain decoding's (or its distribution's) whatever the width.
    KIMI_MLX_DRAFT_WIDTH=max: always `most`."""

    def __init__(self, row_cost: float | None = None, fixed: float | None = None):
        here_fixed, here_row = VERIFY_COST[device_kind()]
        self.row_cost = here_row if row_cost is None else row_cost
        self.fixed = here_fixed if fixed is None else fixed
        self.accept = ACCEPT_PRIOR

    def observe(self, hit: bool) -> None:
        self.accept += ACCEPT_WEIGHT * (float(hit) - self.accept)

    def width(self, most: int) -> int:
        if most < 1 or settings.value(WIDTH_ENV) == "max":
            return max(most, 0)
        a, best, k_best = min(self.accept, 1.0 - 1e-9), MIN_GAIN, 0
        for k in range(1, most + 1):
            gain = (1.0 - a ** (k + 1)) / (1.0 - a) / (1.0 + self.fixed + self.row_cost * k)
            if gain > best:
                best, k_best = gain, k
        return k_best


class ModelDraft:
    """A draft model with its own state, kept holding what the target's state holds: `sync` feeds it the
    committed tokens it lacks (rewinding to a mark first where it drafted past them)."""

    def __init__(self, model, num_draft: int = MODEL_NUM_DRAFT):
        self.model, self.num_draft = model, num_draft
        self.state = model.new_state(1)
        self.tokens: list[int] = []
        self.marks: dict[int, object] = {}  # len(tokens) -> mark, for the positions fed while drafting

    def sync(self, tokens: list[int]) -> mx.array:
        """Make the state hold exactly `tokens` (one at least); the logits after the last one."""
        lcp = 0
        for a, b in zip(self.tokens, tokens):
            if a != b:
                break
            lcp += 1
        lcp = min(lcp, len(tokens) - 1)  # feed the last token again if need be: its logits are wanted
        if lcp < len(self.tokens):
            if lcp in self.marks:
                rewind(self.state, self.marks[lcp])
                self.tokens = self.tokens[:lcp]
            else:
                self.state, self.tokens = self.model.new_state(1), []
        self.marks = {}
        new = tokens[len(self.tokens) :]
        if len(new) > MAX_VERIFY:

            prefill(self.model, self.state, new[:-MAX_VERIFY])
            self.tokens += new[:-MAX_VERIFY]
            new = new[-MAX_VERIFY:]
        return self._feed_rows(new)

    def _feed_rows(self, new: list[int]) -> mx.array:
        """Feed 1 to MAX_VERIFY tokens as decode would; the logits after the last one."""
        logits, _ = verify_forward(self.model, new, self.state)
        self.tokens += new
        return logits[-1]

    def propose(self, committed: list[int], y: int, k: int, sampler: Sampler) -> tuple[list[int], list]:
        """k drafts continuing committed + [y], and the distribution each was drawn from (logprobs [V], or None
        where the draw was greedy)."""
        drafted, qs = [], []
        logits = self.sync(committed + [y])
        base = len(self.tokens)
        for i in range(k):
            self.marks[base + i] = mark(self.state)
            lp = normalize(logits.astype(mx.float32))[None]
            if sampler.greedy:
                d, q = mx.argmax(lp, axis=-1), None
            else:
                q = sampler.filtered(lp)
                d = mx.random.categorical(q, axis=-1, key=_key(sampler))
            drafted.append(d)
            qs.append(None if q is None else q[0])
            if i < k - 1:  # fed as the array it is: the k draft steps queue without a wait for the host
                logits = self.model(d[None], self.state)[0, -1]
        drafts = mx.concatenate(drafted).tolist()
        self.tokens += drafts[:-1]  # the last draft is not fed: a round that keeps it feeds it with the next token
        return drafts, qs


def _key(sampler: Sampler) -> mx.array:
    """A fresh key from the sampler's stream (advancing it, as a draw does)."""
    keys = mx.random.split(sampler.key)
    sampler.key = keys[0]
    return keys[1]


_DRAFTS: dict = {}  # (path, target id) -> ModelDraft: loaded once, its state reused across generations (sync)


def make_draft(model, tokenizer, opts):
    """The draft GenerationOptions `opts` ask for: an NgramDraft, or the ModelDraft of the checkpoint at
    opts.draft (loaded once per target model; a KimiError if it cannot be loaded or speaks another vocabulary)."""
    if getattr(model, "pipeline", None) is not None:
        raise KimiError("speculative decoding runs on one machine; drop --draft or run without --distributed")
    if opts.draft == NGRAM:
        return NgramDraft(opts.num_draft or NUM_DRAFT, opts.ngram)
    key = (opts.draft, id(model))
    if key not in _DRAFTS:
        from .loading import load

        draft_model, draft_tok = load(opts.draft)
        check_draft_model(model, draft_model, tokenizer, draft_tok)
        _DRAFTS.clear()  # one draft model held at a time
        _DRAFTS[key] = ModelDraft(draft_model)
    draft = _DRAFTS[key]
    draft.num_draft = opts.num_draft or MODEL_NUM_DRAFT
    return draft


def check_draft_model(target, draft, target_tok, draft_tok) -> None:
    """A draft must speak the target's vocabulary: same vocabulary size and the same token ids for text."""
    probe = "def f(x):\n    return x  # héllo, 世界"
    if draft.config.vocab_size != target.config.vocab_size or draft_tok.encode(probe) != target_tok.encode(probe):
        raise KimiError(f"the draft model's vocabulary ({draft.config.vocab_size:,} ids) is not the target's "
                        f"({target.config.vocab_size:,} ids, Kimi's tokenizer): give a draft with Kimi's tokenizer "
                        "or --draft ngram")


def speculative_steps(model, state, prompt: list[int], sampler: Sampler, processors, context_tail, context,
                      max_tokens: int, prefill_step_size: int, progress, draft, stats: SpecStats,
                      stop_tokens=()) -> Iterator:
    """generate_step with drafts: the same Steps (same contract: the state holds each yielded token but the
    last one allowed by max_tokens; a consumer that stops leaves it holding the tokens it took), each with
    from_draft set. draft: an NgramDraft or a ModelDraft; context: the tokens the state held before prompt."""

    if not prompt:
        raise KimiError("empty prompt: give at least one token")
    ptoks = list(context_tail) + list(prompt)  # the penalties' token context, growing with committed tokens
    committed = list(context) + list(prompt[:-1])  # what the state holds (for the draft model)

    def drawn_row(logits_row, ctx):
        """(raw logprobs [V], the logprobs the draw is made from [1, V]) of one row with token context ctx."""
        lp = normalize(logits_row.astype(mx.float32))[None]
        if not processors:
            return lp[0], lp
        toks, lg = ctx if isinstance(ctx, mx.array) else mx.array(ctx), logits_row[None]
        for p in processors:
            lg = p(toks, lg)
        return lp[0], normalize(lg.astype(mx.float32))

    def plain_run(y: int, lp: mx.array):
        """Plain steps from the pending token y (already in the n-gram index), pipelined as generate_step's:
        the forward of each token is queued before the token is read. Ends once the text up to a yielded token
        has an n-gram match (or that token is a stop token): returns the pending token then (read, not fed)
        and its logprobs; None when max_tokens ended the generation."""
        nonlocal n
        ya = mx.array([y])
        toks = mx.array(ptoks) if processors else None
        known = y
        guess = None  # prompt lookup's guess at the token now pending (checked once it is read)
        while True:
            if n == max_tokens:
                yield Step(known if known is not None else ya.item(), lp, None)
                return None
            before = mark(state)
            logits = model(ya[None], state)[0, -1]
            if processors:
                toks = mx.concatenate([toks, ya])
            next_lp, next_drawn = drawn_row(logits, toks)
            next_y = sampler(next_drawn)
            mx.async_eval(next_y, next_lp)
            yv = known if known is not None else ya.item()  # waits for the step before, not this one
            if known is None:
                draft.extend([yv])
            if guess:
                width.observe(guess[0] == yv)
            stats.forwards += 1
            stats.tokens += 1
            yield Step(yv, lp, before)  # a consumer that stops here leaves the state holding yv, as plain
            n += 1
            ptoks.append(yv)
            committed.append(yv)
            ya, lp, known = next_y, next_lp, None
            guess = draft.propose(1)
            if yv in stops or (guess and width.width(draft.num_draft) > 0):
                if guess:
                    width.observe(guess[0] == ya.item())
                return ya.item(), lp

    prefill(model, state, prompt[:-1], prefill_step_size, progress, total=len(prompt))
    lp, dr = drawn_row(model(mx.array([prompt[-1:]]), state)[0, -1], ptoks)
    y = sampler(dr).item()
    if progress:
        progress(len(prompt), len(prompt))
    if isinstance(draft, NgramDraft):
        draft.extend(committed + [prompt[-1]])
    committed.append(prompt[-1])
    n = 1  # y is the n-th token
    stops = set(stop_tokens)
    # prompt lookup drafts DraftWidth's width a round; a draft model's drafts adapt to the acceptance: doubled (up
    # to num_draft) after a round that kept them all, halved (down to 1) after one that kept none, so a text the
    # draft cannot guess pays for narrow verifications only; the tokens are the same whatever the width
    width = DraftWidth() if isinstance(draft, NgramDraft) else None
    budget = draft.num_draft
    while True:
        if n == max_tokens:
            yield Step(y, lp, None)
            return
        k = min(width.width(draft.num_draft) if width else budget, max_tokens - 1 - n, MAX_VERIFY - 1)
        qs = None
        drafts = []
        if k > 0 and y not in stops:
            if isinstance(draft, NgramDraft):
                draft.extend([y])
                drafts = draft.propose(k)
            else:
                drafts, qs = draft.propose(committed, y, k, sampler)
            cut = next((i for i, d in enumerate(drafts) if d in stops), None)  # nothing after a stop token counts
            if cut is not None:
                drafts, qs = drafts[: cut + 1], None if qs is None else qs[: cut + 1]
        elif isinstance(draft, NgramDraft):
            draft.extend([y])
        if not drafts and isinstance(draft, NgramDraft) and y not in stops:
            # nothing to look up: plain steps, each queued before the one before it is read (generate_step's
            # overlap of the host's graph building with the device), until the text has a match again
            pending = yield from plain_run(y, lp)
            if pending is None:
                return
            y, lp = pending
            continue
        before = mark(state)
        if drafts:
            logits, marks = verify_forward(model, [y] + drafts, state)
        else:
            logits, marks = model(mx.array([[y]]), state)[0], [None]
        K = len(drafts)
        raw = normalize(logits[: K + 1].astype(mx.float32))  # [K + 1, V]: row i after y, d1..di
        # row i matters only where d1..di are all kept, so each row's penalties see exactly those tokens
        drawn = mx.concatenate([drawn_row(logits[i], ptoks + [y] + drafts[:i])[1] for i in range(K + 1)]) \
            if processors else raw
        accepted, nxt = _decide(sampler, drawn, drafts, qs)
        rows = [raw[i] for i in range(accepted + 1)]
        ctx = ptoks + [y] + drafts[:accepted]
        if drafts and width:
            for i in range(min(accepted + 1, len(drafts))):  # the kept ones, then the first rejected
                width.observe(i < accepted)
        elif drafts:
            if accepted == len(drafts):
                budget = min(2 * budget, draft.num_draft)
            elif accepted == 0:
                budget = max(budget // 2, 1)
        stats.forwards += 1
        stats.drafted += len(drafts)
        stats.accepted += accepted
        stats.tokens += accepted + 1
        if marks[accepted] is not None:
            rewind(state, marks[accepted])
        kept = [y] + drafts[:accepted]
        # yield y (its mark: the state before it), then the accepted drafts; a consumer that stops at the
        # i-th of them leaves the state holding the tokens up to it
        seq = [(y, lp, before, False)] + [(drafts[i], rows[i], marks[i], True) for i in range(accepted)]
        for i, (tok, tok_lp, m, flag) in enumerate(seq):
            try:
                yield Step(tok, tok_lp, m, flag)
            except GeneratorExit:
                if marks[i] is not None:
                    rewind(state, marks[i])
                raise
        n += len(seq)
        ptoks = ctx
        committed += kept
        if isinstance(draft, NgramDraft):
            draft.extend(drafts[:accepted])
        y, lp = nxt, rows[accepted]


def _decide(sampler: Sampler, drawn: mx.array, drafts: list[int], qs) -> tuple[int, int]:
    """(drafts kept, the token drawn after them) against the target's drawn logprobs [K + 1, V] (row i: after
    the first i drafts). qs: per draft the draft's logprobs it was drawn from, None for point masses. One
    sync for a greedy run; with sampling one uniform a draft from one key, then the residual or bonus draw."""
    K = len(drafts)
    if sampler.greedy:
        best = mx.argmax(drawn, axis=-1).tolist()
        j = next((i for i in range(K) if best[i] != drafts[i]), K)
        return j, best[j]
    if K == 0:  # a plain step: the sampler's own draw, as generate_step makes it
        return 0, sampler(drawn).item()
    p = mx.exp(sampler.filtered(drawn))  # the target's sampling distributions
    d = mx.array(drafts)[:, None]
    pd = mx.take_along_axis(p[:K], d, axis=-1)[:, 0]
    q = None if qs is None else mx.exp(mx.stack(qs))
    ratio = pd if q is None else mx.minimum(pd / mx.take_along_axis(q, d, axis=-1)[:, 0], 1.0)
    ok = (mx.random.uniform(shape=(K,), key=_key(sampler)) < ratio).tolist()
    j = next((i for i in range(K) if not ok[i]), K)
    if j == K:  # every draft kept: the bonus draw from the last row
        return K, mx.random.categorical(mx.log(p[K : K + 1]), axis=-1, key=_key(sampler)).item()
    # rejected: draw from normalize(max(0, p - q)); a point mass q takes d out of p. Rejection has probability
    # 0 where this would be empty (p(d) = 1, or p <= q everywhere)
    residual = p[j].at[drafts[j]].multiply(0.0) if q is None else mx.maximum(p[j] - q[j], 0.0)
    lr = mx.log(residual / mx.maximum(residual.sum(), 1e-30))
    return j, mx.random.categorical(lr[None], axis=-1, key=_key(sampler)).item()
