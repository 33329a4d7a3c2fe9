"""Feeding tokens into a state: the prefill step plan (how many tokens a step takes), prefill, and the Step record
a generation yields (the token and the state mark before it was fed). generate.py and speculate.py both build on
these."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx

from .errors import KimiError
from .state_io import StateMark

Progress = Callable[[int, int], None]  # (prompt tokens processed, prompt tokens in all)

PREFILL_STEP = 2048  # prompt tokens a prefill step (mlx-lm's default too) ...
WIDE_STEP = 4096  # ... but this many on a GPU where the prompt ends within WIDE_UNTIL tokens of context: a step's
#   fixed costs (27 paced layers, the MoE's bounded blocks) spread over twice the tokens, for a larger working
#   set; deep in a long prompt the attention over the cache dominates and the wider step gains little, so
#   longer prompts keep the smaller step throughout and their peak stays at weights + cache + 2 GB (RESULTS.md
#   measures both step sizes). The CPU keeps PREFILL_STEP.
WIDE_UNTIL = 32768
STREAMED_STEP = 8192  # ... and this many where the routed experts stream from disk (--experts-memory): a step reads
#   every MoE layer's experts once (~27 GB at the full shape, whatever its length), so its reads per prompt token
#   fall as the step grows, while its working set grows by activations only (RESULTS.md measures both)


def step_length(context: int, n: int, step_size: int = 0, streamed: bool = False) -> int:
    """Tokens a prefill step takes when n prompt tokens are fed to a state holding `context`: step_size if
    given (> 0), else (auto) STREAMED_STEP for a model whose experts stream from disk (streamed), WIDE_STEP on a
    GPU where the prompt ends within WIDE_UNTIL, PREFILL_STEP otherwise."""
    if step_size < 0:
        raise KimiError(f"a prefill step of {step_size} tokens: give 1 or more, or 0 for the automatic plan")
    if step_size:
        return step_size
    if streamed:
        return STREAMED_STEP
    return WIDE_STEP if context + n <= WIDE_UNTIL and mx.default_device() == mx.gpu else PREFILL_STEP


def describe_steps(step_size: int = 0) -> str:
    """The step plan in words, for benchmark headers."""
    if step_size or mx.default_device() != mx.gpu:
        return f"{step_size or PREFILL_STEP} tokens"
    return f"{WIDE_STEP} tokens for prompts ending within {WIDE_UNTIL} tokens of context, else {PREFILL_STEP}"


def step_lengths(context: int, n: int, step_size: int = 0, streamed: bool = False) -> list[int]:
    """The lengths of the steps feeding n tokens to a state holding `context` (step_length, then the rest)."""
    step = step_length(context, n, step_size, streamed)
    return [min(step, n - a) for a in range(0, n, step)]


@dataclass
class Step:
    token: int
    logprobs: mx.array  # [V] raw
    mark: StateMark | None  # the state before `token` was fed; None when it was not fed (the last step)
    from_draft: bool = False


def prefill(model, state, tokens: list[int], step_size: int = 0, progress: Progress | None = None,
            done: int = 0, total: int | None = None) -> None:
    """Feed tokens into state in steps of step_size (0: auto, see step_length), evaluating the state after each."""
    total = len(tokens) if total is None else total
    i = 0
    for n in step_lengths(state.offset, len(tokens), step_size, getattr(model, "offload", None) is not None):
        prefill_step(model, state, mx.array([tokens[i : i + n]]))
        i += n
        if progress:
            progress(done + i, total)


def prefill_step(model, state, tokens: mx.array) -> None:
    """Feed tokens [B, T] into state and evaluate it (long steps on a GPU are paced layer by layer in the
    model)."""
    model.hidden(tokens, state)
    state.eval()
