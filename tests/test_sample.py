"""Samplers and logits processors against numpy references; seeds reproduce."""

import mlx.core as mx
import numpy as np
import pytest

from kimi_mlx.generate import GenerationOptions
from kimi_mlx.sample import (Sampler, apply_min_p, apply_top_k, apply_top_p, make_logits_processors, normalize)

V = 50


def logprobs(seed=0, batch=1):
    rng = np.random.default_rng(seed)
    return normalize(mx.array(rng.standard_normal((batch, V)).astype(np.float32) * 2))


def kept(lp) -> set:
    return set(np.flatnonzero(np.isfinite(np.array(lp)[0])).tolist())


@pytest.mark.parametrize("k", [1, 2, 7, V - 1, V, 0])
def test_top_k_keeps_the_k_best(k):
    lp = logprobs(k)
    ref = np.argsort(-np.array(lp)[0])[: (k or V)]
    out = apply_top_k(lp, k)
    assert kept(out) == set(ref.tolist())
    np.testing.assert_array_equal(np.array(out)[0, ref], np.array(lp)[0, ref])


@pytest.mark.parametrize("p", [1e-6, 0.3, 0.5, 0.9, 0.999, 1.0])
def test_top_p_keeps_the_smallest_set_reaching_p(p):
    lp = logprobs(3)
    probs = np.exp(np.array(lp)[0].astype(np.float64))
    order = np.argsort(-probs)
    before = np.cumsum(probs[order]) - probs[order]
    ref = set(order[before < p].tolist())
    assert kept(apply_top_p(lp, p)) == ref
    assert probs[list(ref)].sum() >= min(p, 1.0) - 1e-6


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 0.99])
def test_min_p_is_relative_to_the_top(min_p):
    lp = logprobs(4)
    probs = np.exp(np.array(lp)[0])
    assert kept(apply_min_p(lp, min_p)) == set(np.flatnonzero(probs >= min_p * probs.max() * (1 - 1e-6)).tolist())


def test_greedy_and_degenerate_filters_pick_the_argmax():
    lp = logprobs(5)
    best = int(np.argmax(np.array(lp)[0]))
    assert Sampler(0.0)(lp).item() == best
    assert Sampler(1.0, top_k=1, seed=0)(lp).item() == best
    assert Sampler(1.0, top_p=1e-6, seed=0)(lp).item() == best
    assert Sampler(1.0, min_p=0.999, seed=0)(lp).item() == best


def test_draws_follow_the_filtered_distribution():
    lp = logprobs(6)
    sampler = Sampler(0.7, top_p=0.9, top_k=20, seed=11)
    target = np.exp(np.array(sampler.filtered(lp))[0])
    rows = mx.broadcast_to(lp, (20000, V))
    counts = np.bincount(np.array(sampler(rows)), minlength=V) / 20000
    assert np.abs(counts - target).max() < 0.015
    assert counts[target == 0].sum() == 0


def test_seed_reproduces_and_ignores_global_random_state():
    lp = logprobs(7)

    def draws(seed):
        s = Sampler(1.0, seed=seed)
        return [s(lp).item() for _ in range(30)]

    a = draws(42)
    mx.random.seed(999)
    mx.random.uniform(shape=(5,))
    assert draws(42) == a
    assert draws(43) != a


def ref_processors(opts, context, generated, logits):
    x = logits.astype(np.float64).copy()
    for t, b in (opts.logit_bias or {}).items():
        x[t] += b
    if opts.repetition_penalty != 1.0:
        for t in set((context + generated)[-opts.repetition_context_size :]):
            x[t] = x[t] * opts.repetition_penalty if x[t] < 0 else x[t] / opts.repetition_penalty
    counts = np.bincount(np.array(generated, dtype=np.int64), minlength=V)
    return x - opts.presence_penalty * (counts > 0) - opts.frequency_penalty * counts


@pytest.mark.parametrize("opts", [
    GenerationOptions(repetition_penalty=1.5, repetition_context_size=4),
    GenerationOptions(repetition_penalty=0.8, repetition_context_size=64),
    GenerationOptions(presence_penalty=0.7, frequency_penalty=0.3),
    GenerationOptions(logit_bias={3: 5.0, 9: -2.5}, repetition_penalty=1.2, frequency_penalty=-0.5),
], ids=["rep-window", "rep-below-1", "presence-frequency", "all"])
def test_processors_equal_reference(opts):
    context, generated = [1, 2, 3, 3, 4], [4, 5, 5, 5, 9, 1]
    logits = np.array(logprobs(8))[0] * 3
    procs = make_logits_processors(opts, len(context))
    out = mx.array(logits[None])
    for p in procs:
        out = p(mx.array(context + generated), out)
    np.testing.assert_allclose(np.array(out)[0], ref_processors(opts, context, generated, logits), rtol=1e-6, atol=1e-6)
