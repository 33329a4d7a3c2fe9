"""Long contexts: the paged MLA cache, many-step prefill, a long prompt against the upstream oracle,
the quantized cache's logit error, and the context limit."""

import mlx.core as mx
import numpy as np
import pytest

import hf_oracle
from kimi_mlx import load_model
from kimi_mlx.errors import KimiError
from kimi_mlx.ops import attention as A
from kimi_mlx.ops import mla_decode as D
from kimi_mlx.state import ContextLimitError, MLAState, ModelState, context_usage, new_state

TOL = 1e-4


def rel_err(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))


def tokens(n, batch=1, seed=0):
    return np.random.default_rng(seed).integers(0, 211, (batch, n))


def rows(n, width=26, batch=2, seed=0):
    return mx.array(np.random.default_rng(seed).normal(size=(batch, n, width)).astype(np.float32))


def valid(st: MLAState) -> np.ndarray:
    v = st.view()
    return np.concatenate([np.array(v.rows(p)) for p in v.pages], axis=1)


def small_pages(state: ModelState, first=16, most=64, grow=8) -> ModelState:
    """Small MLA pages: the last page doubles from `first`, then grows `grow` rows at a time up to `most`."""
    for s in state.layers:
        if isinstance(s, MLAState):
            s.page_first, s.page_max, s.page_grow = first, most, grow
    return state


# --- the paged cache -------------------------------------------------------------------------


def test_last_page_grows_then_stays_at_page_max():
    st = MLAState(page_first=4, page_max=32)
    st.append(rows(200))
    assert [p[0].shape[1] for p in st.pages] == [32] * 6 + [8]
    assert st.length == 200 and st.capacity - st.length < 8
    st = MLAState(page_first=4, page_grow=8, page_max=64)
    for _ in range(20):
        st.append(rows(5))  # 100 rows: a full 64-row page, then one grown 4, 8, 16, 24, 32, 40
    assert [p[0].shape[1] for p in st.pages] == [64, 40] and st.capacity - st.length < 8


def test_append_in_pieces_equals_one_append_and_never_copies_full_pages():
    x = rows(300, seed=1)
    one = MLAState(page_first=8, page_max=64)
    one.append(x)
    pieces = MLAState(page_first=8, page_max=64)
    a = 0
    for n in (1, 7, 8, 1, 50, 64, 65, 3, 101):
        before = pieces.pages
        pieces.append(x[:, a : a + n])
        full = [i for i, p in enumerate(before) if p[0].shape[1] == 64 and sum(q[0].shape[1] for q in before[: i + 1]) <= a]
        assert all(pieces.pages[i] is before[i] for i in full)  # full pages are never copied again
        a += n
    assert a == 300 and len(pieces.pages) == 5
    assert np.array_equal(valid(pieces), valid(one))
    assert np.array_equal(valid(one), np.array(x))


def test_snapshot_is_exact_and_cut_length_rewrites():
    x = rows(120, seed=2)
    st = MLAState(page_first=8, page_max=32)
    st.append(x[:, :50])
    snap = ModelState([st]).snapshot()
    st.append(x[:, 50:])
    assert snap.layers[0].length == 50 and np.array_equal(valid(snap.layers[0]), np.array(x[:, :50]))
    st.length = 30  # cut: the next append overwrites rows 30..
    y = rows(40, seed=3)
    st.append(y)
    assert np.array_equal(valid(st), np.concatenate([np.array(x[:, :30]), np.array(y)], axis=1))
    assert np.array_equal(valid(snap.layers[0]), np.array(x[:, :50]))


@pytest.mark.parametrize("bits", [0, 8, 4])
def test_arrays_round_trip(bits):
    st = MLAState(bits=bits, page_first=8, page_max=32)
    st.append(rows(75, width=64, seed=4))
    back = MLAState.from_arrays(st.arrays())
    assert (back.length, back.bits) == (75, bits)
    assert np.array_equal(valid(back), valid(st))
    back.append(rows(5, width=64, seed=5))
    assert back.length == 80


def test_cache_bits_errors_are_one_line(hf_checkpoint):
    model = load_model(hf_checkpoint("kkkm")[1])  # latent 20 + 6 = 26: not a multiple of 64
    for bits, word in ((3, "cache_bits"), (8, "divisible by 64")):
        with pytest.raises(KimiError, match=word) as e:
            model.new_state(cache_bits=bits)
        assert "\n" not in str(e.value)


# --- the whole model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_case(hf_checkpoint):
    """The tiny 2:1 model and transformers' logits for 3,008 tokens (3,000 prompt + 8 decoded)."""
    torch_model, path = hf_checkpoint("kkkmkm")
    toks = tokens(3008, seed=11)
    return load_model(path), toks, hf_oracle.logits(torch_model, toks)


def test_long_prompt_matches_transformers(long_case, monkeypatch):
    """3,000 prompt tokens in steps of 512 over small pages and small tiles, then 8 decode steps."""
    model, toks, ref = long_case
    monkeypatch.setattr(A, "TILE_BYTES", 3 * 512 * 256 * 4)  # 256 keys per tile at 512 queries
    state = small_pages(model.new_state(), first=64, most=256)
    outs = [model(mx.array(toks[:, a : min(a + 512, 3000)]), state) for a in range(0, 3000, 512)]
    outs += [model(mx.array(toks[:, t : t + 1]), state) for t in range(3000, 3008)]
    assert state.offset == 3008 and len(state.layers[3].pages) > 10
    assert rel_err(mx.concatenate(outs, axis=1), ref) <= TOL


def test_many_step_prefill_equals_one_step(long_case, monkeypatch):
    model, toks, _ = long_case
    x = mx.array(toks[:, :1500])
    one = model(x, model.new_state())
    monkeypatch.setattr(A, "TILE_BYTES", 3 * 64 * 100 * 4)
    state = small_pages(model.new_state(), first=16, most=128)
    cuts = [0, 1, 2, 100, 333, 334, 700, 1024, 1500]
    steps = [model(x[:, a:b], state) for a, b in zip(cuts, cuts[1:])]
    assert rel_err(mx.concatenate(steps, axis=1), one) <= TOL


@pytest.mark.parametrize("bits", [0, 8])
def test_decode_across_pages_with_a_rewind(long_case, dense_model, bits, monkeypatch):
    """One token at a time (the compiled whole-page decode step) across several page boundaries, with a
    snapshot taken mid-page, restored after 30 more tokens, and decoded again: equal to the oracle
    (unquantized) or to a prefill of the same quantized cache (dense_model: its cache rows quantize). Pages of
    16+ rows run their values in 8-row pieces (split-K)."""
    monkeypatch.setattr(D, "SPLIT_ROWS", 8)
    monkeypatch.setattr(D, "SPLIT_MIN_ROWS", 16)
    model, toks, ref = long_case
    if bits:
        model = dense_model
    model.retrace()  # trace the steps again under this test's settings
    try:
        _decode_with_a_rewind(model, toks, ref, bits)
    finally:
        model.retrace()  # and let the next test trace its own


def _decode_with_a_rewind(model, toks, ref, bits):
    state = small_pages(model.new_state(cache_bits=bits), first=16, most=32)
    outs = [model(mx.array(toks[:, :100]), state)]
    snap = None
    for t in range(100, 200):
        if t == 150:
            snap = state.snapshot()
            for u in range(150, 180):
                model(mx.array(toks[:, u : u + 1]), state)
            state.restore(snap)
        outs.append(model(mx.array(toks[:, t : t + 1]), state))
    got = mx.concatenate(outs, axis=1)
    if bits:
        ref = model(mx.array(toks[:, :200]), small_pages(model.new_state(cache_bits=bits), first=16, most=32))
    assert len(state.layers[3].pages) > 5
    assert rel_err(got, ref[:, :200]) <= TOL


@pytest.mark.parametrize("experts", [None, "bounded"], ids=["default-experts", "bounded-experts"])
def test_compiled_prefill_steps_equal_eager(long_case, experts, monkeypatch):
    """Steps of a multiple of 1,024 tokens run each KDA layer's attention compiled, and each FFN half that
    reads nothing back to the host (the dense MLP; the fused MoE on its 'bounded' expert path): the same logits
    and state as eager steps, and the oracle's."""
    model, toks, ref = long_case
    if experts:
        monkeypatch.setenv("KIMI_MLX_EXPERTS", experts)
    x = mx.array(toks[:, :2048])
    outs = {}
    for compiled in (False, True):
        model.compile_prefill = compiled
        state = model.new_state()
        outs[compiled] = mx.concatenate([model(x[:, :1024], state), model(x[:, 1024:], state)], axis=1)
        outs[compiled, "next"] = model(mx.array(toks[:, 2048:2049]), state)
    model.compile_prefill = True
    assert model._prefill is not None
    ffn = {key[2]: step is not None for key, step in model._prefill_ffn.items() if key[1] == 1024}
    assert all(step == (path in ("dense", "bounded")) for path, step in ffn.items()) and (not experts or ffn["bounded"])
    assert rel_err(outs[True], outs[False]) <= 1e-5 and rel_err(outs[True, "next"], outs[False, "next"]) <= 1e-5
    assert rel_err(outs[True], ref[:, :2048]) <= TOL


@pytest.mark.parametrize("where", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_paced_prefill_queues_layer_by_layer_and_changes_nothing(long_case, where, monkeypatch):
    """Steps of PACED_PREFILL tokens or more queue one layer at a time (on a GPU by default; forced here on
    the CPU), each layer awaited before the next is built: one async_eval per layer, the same logits and
    next-token logits as one lazy graph per step."""
    from kimi_mlx.model import decoder

    model, toks, ref = long_case
    x = mx.array(toks[:, :1024])
    if where == "cpu":  # paced on whatever device runs the test (the CPU in CI)
        monkeypatch.setattr(decoder, "PACED_ON", (mx.default_device(),))
    queued, awaited, in_flight = [], set(), []
    real, real_eval = mx.async_eval, mx.eval

    def queue(*a):  # the decoder's per-layer queues (one list each), not the tiled MLA path's per-tile calls
        if len(a) == 1 and isinstance(a[0], list):
            in_flight.append(sum(id(q) not in awaited for q in queued))  # pieces of this step queued, not awaited
            queued.append(a[0])
        return real(*a)

    def wait(*a):
        awaited.update(id(x) for x in a if isinstance(x, list))
        return real_eval(*a)

    monkeypatch.setattr(mx, "async_eval", queue)
    monkeypatch.setattr(mx, "eval", wait)
    outs = {}
    for paced in (False, True):
        monkeypatch.setattr(decoder, "PACED_PREFILL", 256 if paced else 1 << 30)
        state, logits, count, most = model.new_state(), [], 0, 0
        for part in (x[:, :800], x[:, 800:]):  # paced, not paced (224 tokens: under PACED_PREFILL)
            queued.clear(), in_flight.clear()
            logits.append(model(part, state))
            count, most = count + len(queued), max([most, *in_flight])
        outs[paced] = mx.concatenate(logits, axis=1)
        outs[paced, "next"] = model(mx.array(toks[:, 1024:1025]), state)
        outs[paced, "queued"], outs[paced, "ahead"] = count, most
    layers = len(model.model.layers)
    assert outs[False, "queued"] == 0 and outs[True, "queued"] == layers
    assert outs[True, "ahead"] == 0  # a layer is queued only once the one before has run
    assert rel_err(outs[True], outs[False]) <= 1e-6 and rel_err(outs[True, "next"], outs[False, "next"]) <= 1e-6
    assert rel_err(outs[True], ref[:, :1024]) <= TOL


@pytest.fixture(scope="module")
def dense_model(hf_checkpoint):
    """All-dense FFN (no expert routing to flip) and a 128-wide cache row: the quantization error shows as is."""
    return load_model(hf_checkpoint("kkkmkm", kv_lora_rank=122, first_k_dense_replace=6)[1])


# Stated bounds on max |logit error| / max |logit| against the unquantized cache (measured on this model
# with 600 tokens in steps of 100: 8-bit 0.006, 4-bit 0.15; mean KL 3e-7 and 1e-4).
QUANT_BOUNDS = {8: 0.01, 4: 0.25}


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_cache_stays_within_its_stated_error(dense_model, bits):
    toks = mx.array(tokens(600, seed=12))
    exact = dense_model(toks, dense_model.new_state())
    state = dense_model.new_state(cache_bits=bits)
    out = mx.concatenate([dense_model(toks[:, a : a + 100], state) for a in range(0, 600, 100)], axis=1)
    out = mx.concatenate([out, dense_model(mx.array([[5]]), state)], axis=1)
    exact = mx.concatenate([exact, dense_model(mx.array([[5]]), _fed(dense_model, toks))], axis=1)
    e = rel_err(out, exact)
    assert 0 < e <= QUANT_BOUNDS[bits]
    assert state.layers[3].bits == bits and state.nbytes < _fed(dense_model, toks).nbytes


def _fed(model, toks):
    state = model.new_state()
    model(toks, state)
    return state


def test_context_limit_is_one_line_and_leaves_state_alone(hf_checkpoint):
    model = load_model(hf_checkpoint("kkkm")[1])
    model.config.max_position_embeddings = 50
    state = model.new_state()
    model(mx.array(tokens(40)), state)
    snap = state.snapshot()
    with pytest.raises(ContextLimitError) as e:
        model(mx.array(tokens(11)), state)
    assert "\n" not in str(e.value) and "50" in str(e.value) and "40" in str(e.value)
    assert state.offset == 40 and state.layers[3].length == 40
    assert np.array_equal(valid(state.layers[3]), valid(snap.layers[3]))
    usage = context_usage(state, model.config.max_position_embeddings)
    assert (usage.used, usage.limit, usage.left) == (40, 50, 10) and str(usage) == "40 / 50 tokens (10 left)"
    model(mx.array(tokens(10)), state)  # exactly up to the limit is fine
    assert context_usage(state, 50).left == 0


def test_new_state_defaults():
    from kimi_mlx.config import ModelConfig

    cfg = ModelConfig(vocab_size=8, hidden_size=8, num_hidden_layers=2, intermediate_size=8,
                      layer_types=["kda", "mla"], mlp_types=["dense", "dense"], kda_num_heads=1, kda_head_dim=4)
    st = new_state(cfg)
    assert st.layers[1].length == 0 and st.layers[1].pages == () and st.nbytes == st.layers[0].conv.nbytes + \
        st.layers[0].recurrent.nbytes
