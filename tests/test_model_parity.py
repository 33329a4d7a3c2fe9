"""Model-level parity with transformers' KimiLinearForCausalLM (float32), and state-handling identities."""

import mlx.core as mx
import numpy as np
import pytest

import hf_oracle
from kimi_mlx import load_model

TOL = 1e-4

SHAPES = {
    "kda-first-mla-last": dict(layers="kkkm"),
    "mla-first": dict(layers="mkkk"),
    "kda-only": dict(layers="kkk"),
    "mla-only-dense0": dict(layers="mm", first_k_dense_replace=0),
    "dense2": dict(layers="kkmk", first_k_dense_replace=2),
    "no-shared": dict(layers="kmk", n_shared_experts=0),
    "grouped-topk": dict(layers="kkm", num_local_experts=12, n_group=4, topk_group=2, num_experts_per_tok=3),
    "extreme-gates": dict(layers="kkkm", extreme_gates=True),
    "no-renorm": dict(layers="kmk", norm_topk_prob=False),
}


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / (np.abs(np.asarray(b)).max() + 1e-12))


def tokens(n, batch=1, seed=0, vocab=211):
    return np.random.default_rng(seed).integers(0, vocab, (batch, n))


@pytest.mark.parametrize("name", list(SHAPES))
def test_logits_match_transformers(hf_checkpoint, name):
    over = dict(SHAPES[name])
    torch_model, path = hf_checkpoint(**over)
    toks = tokens(120, seed=len(name))
    ref = hf_oracle.logits(torch_model, toks)
    out = np.array(load_model(path)(mx.array(toks)))
    assert rel_err(out, ref) <= TOL, name


def test_batch_two_matches_transformers(hf_checkpoint):
    torch_model, path = hf_checkpoint("kkkm")
    toks = tokens(101, batch=2, seed=7)
    ref = hf_oracle.logits(torch_model, toks)
    out = np.array(load_model(path)(mx.array(toks)))
    assert rel_err(out, ref) <= TOL


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return load_model(hf_checkpoint("kkkmkm")[1])


def test_pieces_equal_one_piece(model):
    toks = mx.array(tokens(110, seed=3))
    full = model(toks)
    state = model.new_state()
    parts = [model(toks[:, a:b], state) for a, b in ((0, 1), (1, 37), (37, 64), (64, 65), (65, 110))]
    assert state.offset == 110
    assert rel_err(mx.concatenate(parts, axis=1), full) <= TOL


def test_token_by_token_equals_full_forward(model):
    toks = mx.array(tokens(40, seed=4))
    full = model(toks)
    state = model.new_state()
    steps = [model(toks[:, t : t + 1], state) for t in range(40)]
    assert rel_err(mx.concatenate(steps, axis=1), full) <= TOL


def test_snapshot_restore_gives_identical_logits(model):
    toks = mx.array(tokens(60, seed=5))
    state = model.new_state()
    model(toks[:, :30], state)
    snap = state.snapshot()
    first = model(toks[:, 30:], state)
    other = model(mx.array(tokens(25, seed=9)), state)  # wander off
    state.restore(snap)
    assert state.offset == 30
    again = model(toks[:, 30:], state)
    assert np.array_equal(np.array(first), np.array(again))
    # the snapshot itself is untouched by the continuation and can be restored twice
    state.restore(snap)
    assert np.array_equal(np.array(model(toks[:, 30:], state)), np.array(first))
    assert not np.array_equal(np.array(other[:, :1]), np.array(first[:, :1]))


def test_batch_rows_equal_single_rows(model):
    toks = mx.array(tokens(50, batch=2, seed=6))
    both = np.array(model(toks))
    for b in range(2):
        assert rel_err(np.array(model(toks[b : b + 1]))[0], both[b]) <= TOL


def test_state_batch_mismatch_is_an_error(model):
    with pytest.raises(ValueError):
        model(mx.array(tokens(3, batch=2)), model.new_state(1))


def test_compiled_decode_equals_eager_decode(model):
    toks = mx.array(tokens(12, seed=8))
    outs = []
    for compiled in (True, False):
        model.compile_decode = compiled
        state = model.new_state()
        model(toks[:, :4], state)
        outs.append(mx.concatenate([model(toks[:, t : t + 1], state) for t in range(4, 12)], axis=1))
    model.compile_decode = True
    assert rel_err(outs[0], outs[1]) <= TOL
