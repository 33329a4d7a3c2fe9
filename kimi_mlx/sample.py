"""Samplers (logprobs -> token) and logits processors ((tokens, logits) -> logits).

Order of a sampling step: processors on raw logits (repetition, presence/frequency penalties,
logit bias), then temperature, then top-k, top-p and min-p filters on the tempered distribution,
then one categorical draw with the sampler's own key (so a seed reproduces independently of any
other use of MLX's global random state). temperature 0 is greedy.

Penalty semantics: repetition_penalty (CTRL/HF: positive logits divided, negative multiplied) over
the last `repetition_context_size` tokens of prompt + output; presence/frequency penalties
(OpenAI) over the generated tokens only; logit_bias adds to the raw logits of the given ids.
"""

from __future__ import annotations

import os
from typing import Callable

import mlx.core as mx

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def apply_top_k(logprobs: mx.array, k: int) -> mx.array:
    """Keep the k most likely ids of [B, V] logprobs, -inf elsewhere."""
    if k <= 0 or k >= logprobs.shape[-1]:
        return logprobs
    idx = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[..., :k]
    masked = mx.full(logprobs.shape, -mx.inf, dtype=logprobs.dtype)
    return mx.put_along_axis(masked, idx, mx.take_along_axis(logprobs, idx, axis=-1), axis=-1)


def apply_top_p(logprobs: mx.array, p: float) -> mx.array:
    """Keep the smallest set of most likely ids whose probability reaches p (the top id always stays)."""
    if p >= 1.0:
        return logprobs
    order = mx.argsort(-logprobs, axis=-1)
    sorted_lp = mx.take_along_axis(logprobs, order, axis=-1)
    probs = mx.exp(sorted_lp)
    before = mx.cumsum(probs, axis=-1) - probs  # mass of strictly more likely ids
    kept = mx.where(before < p, sorted_lp, -mx.inf)
    return mx.put_along_axis(mx.zeros_like(logprobs), order, kept, axis=-1)


def apply_min_p(logprobs: mx.array, min_p: float) -> mx.array:
    """Keep ids whose probability is at least min_p times the top probability."""
    if min_p <= 0.0:
        return logprobs
    top = logprobs.max(axis=-1, keepdims=True)
    return mx.where(logprobs >= top + mx.log(mx.array(min_p, logprobs.dtype)), logprobs, -mx.inf)


def normalize(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def random_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") >> 1


class Sampler:
    """Draws token ids [B] from logprobs [B, V]; its key advances by one split per draw."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                 seed: int | None = None):
        self.temperature, self.top_p, self.top_k, self.min_p = temperature, top_p, top_k, min_p
        self.key = mx.random.key(random_seed() if seed is None else seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def filtered(self, logprobs: mx.array) -> mx.array:
        """The tempered, filtered, renormalised distribution the draw is made from."""
        lp = normalize(logprobs.astype(mx.float32) / self.temperature)
        lp = apply_min_p(apply_top_p(apply_top_k(lp, self.top_k), self.top_p), self.min_p)
        return normalize(lp)

    def __call__(self, logprobs: mx.array) -> mx.array:
        if self.greedy:
            return mx.argmax(logprobs, axis=-1)
        keys = mx.random.split(self.key)
        self.key = keys[0]
        return mx.random.categorical(self.filtered(logprobs), axis=-1, key=keys[1])


def repetition_penalty(penalty: float, context_size: int) -> LogitsProcessor:
    def apply(tokens: mx.array, logits: mx.array) -> mx.array:
        recent = tokens[-context_size:]
        if recent.size == 0:
            return logits
        idx = mx.broadcast_to(recent[None], (logits.shape[0], recent.size))
        sel = mx.take_along_axis(logits, idx, axis=-1)
        return mx.put_along_axis(logits, idx, mx.where(sel < 0, sel * penalty, sel / penalty), axis=-1)

    return apply


def presence_frequency_penalty(presence: float, frequency: float, n_context: int) -> LogitsProcessor:
    def apply(tokens: mx.array, logits: mx.array) -> mx.array:
        generated = tokens[n_context:]
        if generated.size == 0:
            return logits
        counts = mx.zeros((logits.shape[-1],), logits.dtype).at[generated].add(1)
        return logits - presence * (counts > 0).astype(logits.dtype) - frequency * counts

    return apply


def logit_bias(bias: dict[int, float]) -> LogitsProcessor:
    ids = mx.array(list(bias.keys()))
    values = mx.array(list(bias.values()), mx.float32)

    def apply(tokens: mx.array, logits: mx.array) -> mx.array:
        return logits.at[:, ids].add(values.astype(logits.dtype))

    return apply


def make_logits_processors(opts, n_context: int) -> list[LogitsProcessor]:
    """Processors for GenerationOptions `opts`; `tokens` passed to them = context tail + generated,
    where the first n_context are context."""
    procs = []
    if opts.logit_bias:
        procs.append(logit_bias(opts.logit_bias))
    if opts.repetition_penalty != 1.0:
        procs.append(repetition_penalty(opts.repetition_penalty, opts.repetition_context_size))
    if opts.presence_penalty or opts.frequency_penalty:
        procs.append(presence_frequency_penalty(opts.presence_penalty, opts.frequency_penalty, n_context))
    return procs
