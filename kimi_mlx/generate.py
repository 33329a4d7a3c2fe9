"""Token generation: generate_step (ids, chunked prefill, one-step async lookahead), the Generation that
turns steps into Response objects (text, stop strings, timing), stream_generate and generate. One sequence's
sampling (RowSampler) and Responses (ReplyText) are shared with the batch engine (batch.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields, replace
from typing import Iterator

import mlx.core as mx

from .errors import KimiError
from .sample import Sampler, make_logits_processors, normalize
from .feed import Progress, Step, prefill
from .state import ContextLimitError
from .state_io import mark
from .words import count

@dataclass
class GenerationOptions:
    """Every generation option with its default, in one place (the CLI reads its defaults from here)."""

    max_tokens: int = 512
    temperature: float = 0.6
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context_size: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    prefill_step_size: int = 0  # tokens a prefill step; 0: auto (step_length)
    draft: str | None = None  # speculative decoding: "ngram" (prompt lookup) or a draft model's path (speculate.py)
    num_draft: int = 0  # tokens drafted a round; 0: the draft's default
    ngram: int = 3  # longest suffix prompt lookup matches

    @classmethod
    def from_kwargs(cls, **kwargs) -> "GenerationOptions":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise KimiError(f"unknown generation option {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**kwargs).checked()

    def updated(self, **kwargs) -> "GenerationOptions":
        return GenerationOptions.from_kwargs(**{**self.__dict__, **kwargs})

    def checked(self) -> "GenerationOptions":
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        rules = [
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0 = off)"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.repetition_context_size >= 1, "repetition_context_size must be >= 1"),
            (self.top_logprobs >= 0, "top_logprobs must be >= 0"),
            (self.prefill_step_size >= 0, "prefill_step_size must be >= 0 (0 = auto)"),
            (self.draft is None or (isinstance(self.draft, str) and self.draft.strip() != ""),
             "draft must be 'ngram' or a draft model's path (directory, hub repo id or 'demo')"),
            (0 <= self.num_draft <= 15, "num_draft must be in 0..15 (0 = the draft's default)"),
            (1 <= self.ngram <= 16, "ngram must be in 1..16"),
        ]
        for ok, msg in rules:
            if not ok:
                raise KimiError(msg)
        return self


@dataclass
class Response:
    text: str  # new text (may be '' while a character or a possible stop string is incomplete)
    token: int
    logprobs: mx.array  # [V] raw model log-probabilities of this step
    logprob: float | None  # of `token`, when options.logprobs
    top_logprobs: list[tuple[int, float]] | None  # (id, logprob) best first, when options.top_logprobs
    finish_reason: str | None  # None until the last: "stop" or "length"
    prompt_tokens: int  # prompt tokens processed by this call
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    from_draft: bool = False  # the token was a draft the model accepted (speculative decoding)
    spec: object | None = None  # speculate.SpecStats of the generation so far, with a draft


def stop_ids(model, tokenizer) -> set[int]:
    """<|im_end|>, the tokenizer's [EOS] and the config's eos ids."""
    return {tokenizer.im_end_id, tokenizer.eos_id, *model.config.eos_token_ids}


class RowSampler:
    """One sequence's sampling step: logits [1, V] -> (token [1], raw logprobs [1, V]). The logits processors
    see the sequence's context tail plus every token drawn so far (`fed` appends one); the draw is from the
    processed, renormalised distribution with the sequence's own Sampler (and key). generate_step and the
    batched engine (batch.py) share it, so a sequence samples alike alone or in a batch."""

    def __init__(self, sampler: Sampler, processors=(), context=()):
        self.sampler, self.processors = sampler, processors
        self.tokens = mx.array(list(context)) if processors else None

    def __call__(self, logits: mx.array, lp: mx.array | None = None) -> tuple[mx.array, mx.array]:
        """lp: normalize(logits) if the caller has it (a batch normalizes all its rows at once)."""
        lp = normalize(logits.astype(mx.float32)) if lp is None else lp
        drawn = lp
        if self.processors:
            for p in self.processors:
                logits = p(self.tokens, logits)
            drawn = normalize(logits.astype(mx.float32))
        return self.sampler(drawn), lp

    def fed(self, y: mx.array) -> None:
        """Token y [1] was drawn (and is fed next): the processors see it from now on."""
        if self.processors:
            self.tokens = mx.concatenate([self.tokens, y])


def generate_step(model, state, prompt: list[int], sampler: Sampler, processors=(), context_tail=(),
                  max_tokens: int = 512, prefill_step_size: int = 0,
                  progress: Progress | None = None) -> Iterator[Step]:
    """Feed prompt (chunked) into state, then yield sampled Steps; the state already holds each yielded
    token except the last one allowed by max_tokens (the next step is computed ahead, asynchronously)."""
    if not prompt:
        raise KimiError("empty prompt: give at least one token")
    sample = RowSampler(sampler, processors, list(context_tail) + list(prompt))

    def feed(y):
        sample.fed(y)
        return sample(model(y[None], state)[:, -1])

    prefill(model, state, prompt[:-1], prefill_step_size, progress, total=len(prompt))
    y, lp = sample(model(mx.array([prompt[-1:]]), state)[:, -1])
    mx.async_eval(y, lp)
    for n in range(1, max_tokens + 1):
        m = None
        if n < max_tokens:
            m = mark(state)
            next_y, next_lp = feed(y)
            mx.async_eval(next_y, next_lp)
        if n == 1 and progress:
            progress(len(prompt), len(prompt))
        yield Step(y.item(), lp[0], m)
        if m is None:
            return
        y, lp = next_y, next_lp


class StopMatcher:
    """Holds back text that may be the start of a stop string; cuts the text before a complete one."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = next((k for k in range(len(self.pending), 0, -1)
                     if any(s.startswith(self.pending[-k:]) for s in self.stops)), 0)
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class ReplyText:
    """One sequence's Steps as Responses: text deltas (detokenized, stop strings held back and cut), the
    finish reason (a stop token, a stop string, or max_tokens reached), logprobs and timings. Generation and the
    batched engine (batch.py) share it. .tokens: the ids pushed so far; .finish_reason once finished."""

    def __init__(self, model, tokenizer, opts: GenerationOptions, max_tokens: int, prompt_tokens: int,
                 prompt_seconds: float = 0.0):
        """prompt_tokens: the prompt's length as Responses report it; prompt_seconds: time spent on it before
        the clock starts (start())."""
        self.opts, self.max_tokens, self.prompt_tokens = opts, max_tokens, prompt_tokens
        self.prompt_seconds = prompt_seconds
        self.stops = stop_ids(model, tokenizer)
        self.detok, self.stopper = tokenizer.detokenizer(), StopMatcher(opts.stop)
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.spec = None  # a speculative generation's speculate.SpecStats, copied into each Response
        self.start()

    def start(self) -> None:
        self.t0, self.t_first = time.perf_counter(), None

    def push(self, step: Step) -> Response:
        """The Response for the next Step (its finish_reason set if this is the sequence's last)."""
        self.t_first = self.t_first or time.perf_counter()
        self.tokens.append(step.token)
        detok, stopper = self.detok, self.stopper
        finish = None
        if step.token in self.stops:
            text, hit = stopper.push(detok.finalize())
            text += "" if hit else stopper.flush()
            finish = "stop"
        else:
            text, hit = stopper.push(detok.add(step.token))
            if hit:
                finish = "stop"
            elif len(self.tokens) == self.max_tokens:
                tail, hit = stopper.push(detok.finalize())
                text += tail + ("" if hit else stopper.flush())
                finish = "stop" if hit else "length"
        self.finish_reason = finish
        return self._response(step, text, finish)

    def _response(self, step: Step, text: str, finish) -> Response:
        now, t_first = time.perf_counter(), self.t_first
        n = len(self.tokens)
        logprob = top = None
        if self.opts.logprobs or self.opts.top_logprobs:
            logprob = step.logprobs[step.token].item()
        if self.opts.top_logprobs:
            k = min(self.opts.top_logprobs, step.logprobs.shape[-1])
            idx = mx.argpartition(-step.logprobs, kth=k - 1)[:k]
            vals = step.logprobs[idx].tolist()
            top = sorted(zip(idx.tolist(), vals), key=lambda iv: -iv[1])
        return Response(
            text=text, token=step.token, logprobs=step.logprobs, logprob=logprob, top_logprobs=top,
            finish_reason=finish, prompt_tokens=self.prompt_tokens,
            prompt_tps=self.prompt_tokens / max(self.prompt_seconds + t_first - self.t0, 1e-9), generation_tokens=n,
            generation_tps=(n - 1) / (now - t_first) if n > 1 and now > t_first else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9, from_draft=step.from_draft,
            spec=None if self.spec is None else replace(self.spec),
        )


def row_options(opts: GenerationOptions, j: int) -> GenerationOptions:
    """Row j's options of n sharing one prompt: a seeded option gives row j the seed seed + j."""
    if opts.seed is None or j == 0:
        return opts
    return opts.updated(seed=opts.seed + j)


def reply_room(model, state, prompt_tokens: int, opts: GenerationOptions, reserve: int = 0) -> int:
    """The most tokens a reply may take: opts.max_tokens within the context limit after `state` and
    prompt_tokens more (the last reply token is not fed, hence + 1); ContextLimitError if none."""
    room = model.config.max_position_embeddings - (state.offset + prompt_tokens) + 1 - reserve
    if room < 1:
        raise ContextLimitError(
            f"context full: {count(state.offset + prompt_tokens, 'token', ',')} leave no room to reply within "
            f"the model's limit of {model.config.max_position_embeddings:,}; start a new conversation")
    return min(opts.max_tokens, room)


def sampling_context(opts: GenerationOptions, context, prompt) -> tuple[list, list[int]]:
    """(logits processors, context tail) of a reply to `prompt` after `context`, as generate_step takes them: the
    processors see tail + prompt + the tokens generated, the first len(tail) + len(prompt) of them context (the
    presence and frequency penalties count only the generated ones; the repetition penalty's window is the last
    repetition_context_size tokens of all)."""
    tail = list(context)[-opts.repetition_context_size :]
    processors = make_logits_processors(opts, len(tail) + len(prompt))
    return processors, tail if processors else []


class Generation:
    """One generation over `state`: iterate for Responses. Afterwards (or after the consumer stops):
    .tokens (ids yielded), .last (the last Step), .finish_reason."""

    def __init__(self, model, tokenizer, state, prompt: list[int], opts: GenerationOptions,
                 context: list[int] = (), progress: Progress | None = None, reserve: int = 0):
        """reserve: tokens the caller will feed after the reply (kept free of the context limit)."""
        self.model, self.tokenizer, self.state, self.prompt = model, tokenizer, state, list(prompt)
        self.opts, self.progress = opts, progress
        self.max_tokens = reply_room(model, state, len(self.prompt), opts, reserve)
        self.processors, self.context_tail = sampling_context(opts, context, self.prompt)
        self.context = list(context)
        self.draft = self.spec = None
        if opts.draft:  # speculative decoding (speculate.py)
            from .speculate import SpecStats, make_draft

            self.draft, self.spec = make_draft(model, tokenizer, opts), SpecStats()
        self.tokens: list[int] = []
        self.last: Step | None = None
        self.finish_reason: str | None = None

    def __iter__(self) -> Iterator[Response]:
        opts = self.opts
        sampler = Sampler(opts.temperature, opts.top_p, opts.top_k, opts.min_p, opts.seed)
        reply = ReplyText(self.model, self.tokenizer, opts, self.max_tokens, len(self.prompt))
        reply.spec = self.spec
        self.tokens = reply.tokens
        mx.reset_peak_memory()
        reply.start()
        if self.draft is not None:
            from .speculate import speculative_steps

            steps = speculative_steps(self.model, self.state, self.prompt, sampler, self.processors,
                                      self.context_tail, self.context, self.max_tokens, opts.prefill_step_size,
                                      self.progress, self.draft, self.spec, reply.stops)
        else:
            steps = generate_step(self.model, self.state, self.prompt, sampler, self.processors, self.context_tail,
                                  self.max_tokens, opts.prefill_step_size, self.progress)
        try:
            for step in steps:
                self.last = step
                r = reply.push(step)
                self.finish_reason = reply.finish_reason
                yield r
                if r.finish_reason:
                    break
        finally:
            steps.close()  # a speculative run rewinds the state to the last token taken


def prompt_ids(tokenizer, prompt, tools=None, allow_special: bool = False, vocab_size: int | None = None) -> list[int]:
    """A string is used as is; a list of message dicts goes through the chat template; a list of ints is ids,
    each checked against vocab_size where given (the embedding lookup reads an out-of-range id from outside the
    table, which can crash the process)."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, allow_special=allow_special)
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
        bad = [t for t in prompt if vocab_size is not None and not 0 <= t < vocab_size]
        if bad:
            raise KimiError(f"token id {bad[0]} is outside the model's vocabulary [0, {vocab_size}); pass ids made "
                            f"by this model's tokenizer")
        return list(prompt)
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, tools=tools,
                                         allow_special=allow_special)


def stream_generate(model, tokenizer, prompt, *, tools=None, allow_special: bool = False,
                    progress: Progress | None = None, **options) -> Iterator[Response]:
    """Yield one Response per generated token (see GenerationOptions for the options)."""
    opts = GenerationOptions.from_kwargs(**options)
    ids = prompt_ids(tokenizer, prompt, tools, allow_special, model.config.vocab_size)
    yield from Generation(model, tokenizer, model.new_state(1), ids, opts, progress=progress)


def generate(model, tokenizer, prompt, **kwargs) -> str:
    """The generated text (stop strings and stop tokens excluded)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))


def stats_line(r: Response) -> str:
    """One line of a finished reply's numbers, as the CLI prints it."""
    spec = f" | {r.spec.line()}" if getattr(r, "spec", None) is not None else ""
    return (f"prompt: {count(r.prompt_tokens, 'token')}, {r.prompt_tps:.1f} tok/s | generation: "
            f"{count(r.generation_tokens, 'token')}, {r.generation_tps:.1f} tok/s | peak memory {r.peak_memory:.2f} GB"
            f"{spec}")
