"""Many rows on a GPU (`pytest -m gpu` on the device machine): a batched decode step's rows and a speculative
verification's rows (one sequence's, and a batch's) against the same tokens decoded one sequence and one token at a time, at the real model's
depth and expert count ('narrow' widths) in float32 (TF32 off: conftest). These are the paths that differ on a
GPU: the projections of 2-7 rows padded to one GEMM (ops/linear.padded_rows, lm_head here), from 8 rows one matrix
(one_matrix), the batched KDA, MLA and expert kernels, and the verification's rows. On a CPU they take the ops
and still compare."""

import mlx.core as mx
import numpy as np
import pytest

from kimi_mlx import bench, settings
from kimi_mlx.batch_state import BatchState
from kimi_mlx.feed import prefill
from kimi_mlx.model.verify import verify_forward

pytestmark = pytest.mark.gpu

TOL = 1e-3  # relative to the row's largest logit: #35's bound for batched rows at the real shape


@pytest.fixture(scope="module")
def model():
    m, _, _ = bench.build("narrow", bits=4, dtype=mx.float32, peer=False)
    return m


def rel(a: mx.array, b: mx.array) -> float:
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


@pytest.mark.parametrize("B", [3, 8])
def test_batched_decode_rows_match_each_sequence_alone(model, B):
    vocab = model.config.vocab_size
    rng = np.random.default_rng(B)
    batch = BatchState(model, max_batch=8)
    alone = []
    for b in range(B):
        s = model.new_state(1)
        prefill(model, s, rng.integers(0, vocab, 40 + 37 * b).tolist())  # ragged: each row its own length
        batch.add(s)
        alone.append(s)
    for _ in range(3):
        toks = rng.integers(0, vocab, batch.capacity)  # slots past B compute on zeros and are not read
        batch.prepare()
        got = model.decode_rows(mx.array(toks).reshape(-1, 1), batch)[:, -1]
        batch.advance()
        for b in range(B):
            want = model(mx.array([[int(toks[b])]]), alone[b])[0, -1]
            assert rel(got[b], want) <= TOL, (B, b)


@pytest.mark.parametrize("T, rows_kernel", [(3, "off"), (5, "off"), (9, "off"), (5, "on"), (9, "on")])
def test_verification_rows_match_decode(model, T, rows_kernel):
    """rows_kernel 'on': the KDA steps of all T tokens in one kda_decode_rows launch (KIMI_MLX_KDA_ROWS)."""
    vocab = model.config.vocab_size
    rng = np.random.default_rng(T)
    prompt = rng.integers(0, vocab, 100).tolist()
    plain, spec = model.new_state(1), model.new_state(1)
    prefill(model, plain, prompt)
    prefill(model, spec, prompt)
    toks = rng.integers(0, vocab, T).tolist()
    model.retrace()  # traced under this setting, not an earlier test's
    with settings.override(KIMI_MLX_KDA_ROWS=rows_kernel):
        logits, _ = verify_forward(model, toks, spec)
        mx.eval(logits)
    model.retrace()
    for i, t in enumerate(toks):
        want = model(mx.array([[t]]), plain)[0, -1]
        assert rel(logits[i], want) <= TOL, (T, i)


def test_batched_verification_rows_match_each_sequence_decoding(model):
    """Three sequences at their own lengths, T = 5 tokens a slot in one forward (model/verify.verify_batch, the
    batched speculative round of spec_batch.py): every slot's rows against its own decode steps."""
    from kimi_mlx.model.verify import verify_batch

    vocab = model.config.vocab_size
    rng = np.random.default_rng(11)
    batch = BatchState(model, max_batch=4)
    alone = []
    for n in (40, 90, 65):
        s = model.new_state(1)
        prefill(model, s, rng.integers(0, vocab, n).tolist())
        batch.add(s)
        alone.append(s)
    T = 5
    toks = rng.integers(0, vocab, (batch.capacity, T))
    logits, _ = verify_batch(model, mx.array(toks, mx.uint32), batch)
    mx.eval(logits)
    for b, s in enumerate(alone):
        for t in range(T):
            want = model(mx.array([[int(toks[b, t])]]), s)[0, -1]
            assert rel(logits[b, t], want) <= TOL, (b, t)


def test_batched_decode_rows_on_the_wide_expert_kernels(model):
    """KIMI_MLX_EXPERTS=wide (moe_gate_up_wide, moe_down_wide): a batched decode step's rows against each sequence
    decoded alone on the default expert kernels."""
    from kimi_mlx.ops.kda import gpu_backend

    if gpu_backend() is None:
        pytest.skip("the expert kernels run on a Metal or CUDA device")
    vocab = model.config.vocab_size
    rng = np.random.default_rng(21)
    batch = BatchState(model, max_batch=8)
    alone = []
    for b in range(5):
        s = model.new_state(1)
        prefill(model, s, rng.integers(0, vocab, 30 + 23 * b).tolist())
        batch.add(s)
        alone.append(s)
    for _ in range(2):
        toks = rng.integers(0, vocab, batch.capacity)
        batch.prepare()
        model.retrace()  # the steps traced again under the override (they trace their expert path)
        try:
            with settings.override(KIMI_MLX_EXPERTS="wide"):
                got = model.decode_rows(mx.array(toks).reshape(-1, 1), batch)[:, -1]
                mx.eval(got)
        finally:
            model.retrace()
        batch.advance()
        for b in range(5):
            want = model(mx.array([[int(toks[b])]]), alone[b])[0, -1]
            assert rel(got[b], want) <= TOL, b
