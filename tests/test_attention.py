"""MLA attention paths (tiled online softmax, fused, quantized cache) against the plain reference twin."""

from functools import partial

import mlx.core as mx
import numpy as np
import pytest

from kimi_mlx import state as kstate
from kimi_mlx.errors import ConfigError
from kimi_mlx.ops import attention as A
from kimi_mlx.ops import mla_decode as D
from kimi_mlx.ops.attention import Tiling, choose_tiling, mla_attention, mla_attention_ref
from kimi_mlx.state import MLAState, encode_rows

H, NOPE, PE, L, V = 3, 12, 6, 20, 10
SCALE = (NOPE + PE) ** -0.5


def inputs(B, T, S, seed=0, latent=L, pe=PE):
    r = np.random.default_rng(seed)
    rows = mx.array(r.normal(size=(B, S, latent + pe)).astype(np.float32))
    q = mx.array(r.normal(size=(B, H, T, NOPE + pe)).astype(np.float32))
    k_up = mx.array(r.normal(0, 0.4, size=(H, NOPE, latent)).astype(np.float32))
    v_up = mx.array(r.normal(size=(H, V, latent)).astype(np.float32))
    return rows, q, k_up, v_up


def paged(rows, T, page_first=8, page_max=32, bits=0):
    """The cache as the model builds it: earlier rows, then this call's T rows."""
    st = MLAState(bits=bits, page_first=page_first, page_max=page_max)
    S = rows.shape[1]
    if S > T:
        st.append(rows[:, : S - T])
    return st.append(rows[:, S - T :])


def err(a, b):
    return float(mx.abs(a - b).max())


# T, S, tilings: lengths straddle tile and page sizes (pages 8, 16, 32, 32, ...)
CASES = [
    (1, 1), (1, 9), (1, 57), (4, 57), (8, 8), (31, 33), (33, 33), (64, 65), (100, 120),
]


@pytest.mark.parametrize("absorbed", [False, True], ids=["expanded", "absorbed"])
@pytest.mark.parametrize("T,S", CASES)
def test_tiled_equals_plain(T, S, absorbed):
    rows, q, k_up, v_up = inputs(2, T, S, seed=T * 1000 + S)
    ref = mla_attention_ref(q, rows, k_up, v_up, SCALE)
    cache = paged(rows, T)
    for tiling in (Tiling(T, 7), Tiling(T, 16), Tiling(5, 8), Tiling(1, 1), Tiling(T, 4096)):
        out = mla_attention(q, cache, k_up, v_up, SCALE, path="tiled", absorbed=absorbed, tiling=tiling)
        assert out.shape == (2, H, T, V)
        assert err(out, ref) < 2e-5, tiling


@pytest.mark.parametrize("absorbed", [False, True], ids=["expanded", "absorbed"])
@pytest.mark.parametrize("T,S", [(1, 40), (6, 40), (40, 40)])
def test_fused_and_auto_equal_plain(T, S, absorbed):
    rows, q, k_up, v_up = inputs(2, T, S, seed=S + T)
    ref = mla_attention_ref(q, rows, k_up, v_up, SCALE)
    one_page = paged(rows, T, page_first=64, page_max=64)
    assert len(one_page.pages) == 1
    assert err(mla_attention(q, one_page, k_up, v_up, SCALE, path="fused", absorbed=absorbed), ref) < 2e-5
    for cache in (one_page, paged(rows, T)):
        assert err(mla_attention(q, cache, k_up, v_up, SCALE, path="auto"), ref) < 2e-5
        assert err(mla_attention(q, cache, k_up, v_up, SCALE, path="ref"), ref) == 0


def test_fused_is_taken_only_for_one_dense_page_that_fits_in_expanded_form(monkeypatch):
    T = 40  # above the absorbed/expanded crossover (38 at these dims)
    rows, q, k_up, v_up = inputs(1, T, 40)
    taken = []
    monkeypatch.setattr(A, "_fused", lambda *a: taken.append("fused"))
    monkeypatch.setattr(A, "_tiled", lambda *a, **k: taken.append("tiled"))
    one_page = paged(rows, T, page_first=64, page_max=64)
    mla_attention(q, one_page, k_up, v_up, SCALE)
    mla_attention(q, paged(rows, T), k_up, v_up, SCALE)  # several pages
    mla_attention(q[:, :, -4:], one_page, k_up, v_up, SCALE)  # 4 queries: absorbed form
    monkeypatch.setattr(A, "TILE_BYTES", 1 * H * T * 40 * 4 - 1)  # one byte short of the whole score array
    mla_attention(q, one_page, k_up, v_up, SCALE)
    assert taken == ["fused", "tiled", "tiled", "tiled"]


def test_env_override(monkeypatch):
    monkeypatch.setenv(A.ENV, "bogus")
    with pytest.raises(ConfigError, match=A.ENV):
        A.mode()
    monkeypatch.setenv(A.ENV, "ref")
    assert A.mode() == "ref"
    monkeypatch.setenv(A.TILE_ENV, "256")
    assert A.tile_bytes_from_env() == 256 << 20
    for bad in ("0", "1.5", "lots"):
        monkeypatch.setenv(A.TILE_ENV, bad)
        with pytest.raises(ConfigError, match=A.TILE_ENV):
            A.tile_bytes_from_env()
    monkeypatch.delenv(A.TILE_ENV)
    assert A.tile_bytes_from_env() == 64 << 20


@pytest.mark.parametrize("B,H_,T,S", [(1, 32, 2048, 1 << 20), (1, 32, 1, 1 << 20), (2, 32, 16384, 1 << 20),
                                      (1, 32, 1 << 20, 1 << 20), (1, 3, 5, 7)])
def test_tiling_fits_the_budget(B, H_, T, S):
    t = choose_tiling(B, H_, T, S)
    assert 1 <= t.query_chunk <= T and 1 <= t.tile_keys <= S
    assert B * H_ * t.query_chunk * t.tile_keys * 4 <= A.TILE_BYTES
    assert t.tile_keys >= min(S, A.MIN_TILE_KEYS)


@pytest.mark.parametrize("T,S", [(1024, 1024), (1100, 2100), (1024, 2049)])
def test_long_first_steps_chunk_their_queries_and_equal_plain(T, S):
    """Where the new queries are at least half the keys, the tiling splits them into CAUSAL_CHUNKS chunks
    (each reads only the keys it sees, from one expansion of every key); otherwise one chunk. Either way the
    result is plain attention's."""
    t = choose_tiling(1, H, T, S, causal=True)
    assert t.query_chunk == (-(-T // A.CAUSAL_CHUNKS) if 2 * T >= S else T)
    assert choose_tiling(1, H, T, S).query_chunk == T
    rows, q, k_up, v_up = inputs(1, T, S, seed=T + S)
    out = mla_attention(q, paged(rows, T, page_first=256, page_max=1024), k_up, v_up, SCALE, path="tiled",
                        absorbed=False)
    ref = mla_attention_ref(q, rows, k_up, v_up, SCALE)
    assert err(out, ref) < 1e-5 * float(mx.abs(ref).max())  # float32 sums over ~2k keys


def test_absorbed_choice_follows_the_cost_model():
    # real shape: absorbed for decode and short calls, expanded for prefill steps
    assert A.absorbed_is_cheaper(1, 512, 64, 128, 128)
    assert A.absorbed_is_cheaper(229, 512, 64, 128, 128)  # 768 T <= 576 * 192 + 512 * 128
    assert not A.absorbed_is_cheaper(230, 512, 64, 128, 128)
    assert not A.absorbed_is_cheaper(2048, 512, 64, 128, 128)


def test_tiled_working_set_does_not_grow_with_the_cache():
    """Peak memory of one tiled call stays put as the cache grows 4x, far below one full score array."""
    r = np.random.default_rng(1)
    heads, T, latent, pe, nope, v = 8, 512, 64, 32, 32, 32
    q = mx.array(r.normal(size=(1, heads, T, nope + pe)).astype(np.float32))
    k_up = mx.array(r.normal(0, 0.1, size=(heads, nope, latent)).astype(np.float32))
    v_up = mx.array(r.normal(size=(heads, v, latent)).astype(np.float32))
    peaks = []
    for S in (4096, 16384):
        cache = paged(mx.array(r.normal(size=(1, S, latent + pe)).astype(np.float32)), T, 256, 4096)
        mx.eval(q, k_up, v_up, [p for page in cache.pages for p in page])
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(mla_attention(q, cache, k_up, v_up, SCALE, path="tiled", absorbed=False, tiling=Tiling(T, 128)))
        peaks.append(mx.get_peak_memory() - base)
    full_scores = heads * T * 16384 * 4
    assert peaks[1] < 1.2 * peaks[0], peaks
    assert peaks[1] < full_scores / 4, peaks


@pytest.mark.parametrize("absorbed", [False, True], ids=["expanded", "absorbed"])
def test_tiles_waiting_for_frees_equal_plain(monkeypatch, absorbed):
    """With no slack every tile waits (and the limit rises): same result."""
    from kimi_mlx import working_set

    monkeypatch.setattr(A, "FREE_SLACK", 0)
    monkeypatch.setattr(working_set, "FREE_WAIT_S", 0.001)
    rows, q, k_up, v_up = inputs(2, 9, 57, seed=5)
    out = mla_attention(q, paged(rows, 9), k_up, v_up, SCALE, path="tiled", absorbed=absorbed, tiling=Tiling(9, 8))
    assert err(out, mla_attention_ref(q, rows, k_up, v_up, SCALE)) < 2e-5


@pytest.mark.parametrize("bits,tol", [(8, 0.04), (4, 0.45)])  # sharp random attention; model-level bounds: test_long_context
@pytest.mark.parametrize("absorbed", [False, True], ids=["expanded", "absorbed"])
def test_quantized_cache(bits, tol, absorbed):
    """Exact against the reference on the dequantized rows; within tol of the unquantized cache."""
    T, S, latent, pe = 5, 70, 58, 6  # W = 64: one quantization group per row
    rows, q, k_up, v_up = inputs(2, T, S, seed=bits, latent=latent, pe=pe)
    cache = paged(rows, T, bits=bits)
    dq = mx.concatenate([cache.rows(p) for p in cache.pages], axis=1)
    out = mla_attention(q, cache, k_up, v_up, SCALE, absorbed=absorbed, tiling=Tiling(T, 16))
    assert err(out, mla_attention_ref(q, dq, k_up, v_up, SCALE)) < 2e-5
    chunked = mla_attention(q, cache, k_up, v_up, SCALE, absorbed=absorbed, tiling=Tiling(2, 16))  # expanded: once
    assert err(chunked, out) < 2e-5
    exact = mla_attention_ref(q, rows, k_up, v_up, SCALE)
    assert err(out, exact) / float(mx.abs(exact).max()) < tol
    assert err(out, exact) > 0  # it really is quantized


@pytest.mark.parametrize("absorb", [False, True])
@pytest.mark.parametrize("bits", [0, 8])
@pytest.mark.parametrize("S", [1, 8, 9, 57, 100])
def test_decode_over_whole_pages(monkeypatch, S, bits, absorb):
    """A one-token step as the decoder runs it: the new row scattered into decode_slot's last page at its
    `row`, then mla_decode over whole pages, masking the last page's rows past `row`: equal to the reference
    on the S + 1 valid rows, whatever the rows past them hold; split-K pieces (SPLIT_ROWS) included; the
    absorbed query and values from k_up and v_up or from kept absorb and value matrices."""
    monkeypatch.setattr(D, "SPLIT_ROWS", 4)
    monkeypatch.setattr(D, "SPLIT_MIN_ROWS", 8)
    latent, pe = (58, 6) if bits else (L, PE)
    rows, q, k_up, v_up = inputs(2, 1, S + 1, seed=S, latent=latent, pe=pe)
    st = MLAState(bits=bits, page_first=8, page_max=32)
    st.append(rows[:, :S])
    junk = mx.array(np.random.default_rng(1).normal(0, 50, (2, 40, latent + pe)).astype(np.float32))
    if st.capacity > S:  # fill the unused rows with large junk, then cut back
        st.append(junk[:, : st.capacity - S])
        st.length = S
    slot = st.decode_slot()
    written = encode_rows(rows[:, S:], bits, slot.pages[-1][0].dtype)
    last = tuple(mx.put_along_axis(p, slot.row, r, axis=1) for p, r in zip(slot.pages[-1], written))
    cache = kstate.LatentCache(slot.pages[:-1] + (last,), bits, 64)
    dq = mx.concatenate([cache.rows(p) for p in cache.pages], axis=1)[:, : S + 1]
    kept = (A.absorb_matrix(k_up, pe, SCALE), A.value_matrix(v_up, pe)) if absorb else ()
    out = D.mla_decode(q, cache, slot.row, k_up, v_up, SCALE, *kept)
    assert err(out, mla_attention_ref(q, dq, k_up, v_up, SCALE)) < 2e-5


def test_decode_slot_after_a_cut_and_snapshot():
    """decode_slot drops pages past the write position, grows the last page (or adds one once it is at
    page_max) when it is full, and never changes a snapshot's pages."""
    from dataclasses import replace

    st = MLAState(page_first=4, page_max=8)
    st.append(mx.ones((1, 12, 3)))  # pages 8 + 4
    assert [p[0].shape[1] for p in st.pages] == [8, 4]
    snap = replace(st)
    st.length = 3  # cut into the first page
    slot = st.decode_slot()
    pages, row = slot.pages, slot.row
    assert [p[0].shape[1] for p in pages] == [8] and row.tolist() == [[[3]]]
    st.commit_decode((mx.put_along_axis(pages[-1][0], row, mx.full((1, 1, 3), 7.0), axis=1),))
    st.length = 8
    slot = st.decode_slot()  # first page full and at page_max: a new page
    assert [p[0].shape[1] for p in slot.pages] == [8, 4] and slot.row.item() == 0
    assert [p[0].shape[1] for p in snap.pages] == [8, 4] and float(snap.pages[0][0].min()) == 1.0
    assert float(snap.pages[0][0][0, 3, 0]) == 1.0 and float(st.pages[0][0][0, 3, 0]) == 7.0


def test_decode_slot_grows_a_small_last_page_by_copying_it():
    from dataclasses import replace

    st = MLAState(page_first=4, page_max=16)
    st.append(mx.arange(12, dtype=mx.float32).reshape(1, 4, 3))
    snap = replace(st)
    slot = st.decode_slot()
    assert [p[0].shape[1] for p in slot.pages] == [8] and slot.row.item() == 4
    assert np.array_equal(np.array(slot.pages[0][0][:, :4]), np.arange(12).reshape(1, 4, 3))
    assert [p[0].shape[1] for p in snap.pages] == [4]


@pytest.mark.parametrize("absorbed", [False, True], ids=["expanded", "absorbed"])
def test_bf16_tiles_stay_close_to_float32(absorbed):
    """bf16 inputs: the probabilities are stored in bf16 and their row sums come from the values matmul's
    float32 accumulator; over 600 keys in 8 tiles the result stays within bf16 rounding of float32."""
    T, S = 6, 600
    rows, q, k_up, v_up = inputs(1, T, S, seed=3)
    ref = mla_attention_ref(q, rows, k_up, v_up, SCALE)
    bf = [x.astype(mx.bfloat16) for x in (rows, q, k_up, v_up)]
    out = mla_attention(bf[1], paged(bf[0], T), bf[2], bf[3], SCALE, path="tiled", absorbed=absorbed,
                        tiling=Tiling(T, 80))
    assert err(out.astype(mx.float32), ref) / float(mx.abs(ref).max()) < 3e-2


def test_page_sizes_double_then_grow_linearly():
    st = MLAState(page_first=4, page_grow=16, page_max=64)
    assert [st.page_size(n) for n in (1, 4, 5, 9, 17, 33, 49, 64, 1000)] == [4, 4, 8, 16, 32, 48, 64, 64, 64]


# -- the cache rows kernel (latent norm | pe) ------------------------------------------------------

import kernel_emulator  # noqa: E402


@pytest.mark.skipif(not kernel_emulator.available(), reason="g++ is not installed")
@pytest.mark.parametrize("kind", ["metal", "cuda"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_cache_rows_kernel_text_runs_right_on_cpu(kind, dtype):
    """pe narrower than a lane group's stride (48 columns over 32 lanes), rows of very different scale."""
    from metal_kernels import group_rows

    rng = np.random.default_rng(9)
    rows, Lw, W = 5, 64, 112
    ckv = mx.array((rng.standard_normal((rows, W)) * np.array([1e-3, 1, 30, 1e3, 5])[:, None]).astype(np.float32))
    ckv = ckv.astype(dtype)
    w = mx.array(rng.uniform(0.5, 1.5, Lw).astype(np.float32)).astype(dtype)
    (got,) = kernel_emulator.emulate("mla_cache_row", kind, [ckv, w, mx.array([1e-6], mx.float32)],
                                     (("L", Lw), ("W", W)), grid=(32 * rows, 1, 1),
                                     threadgroup=(32 * group_rows(rows, 4), 1, 1), output_shapes=[ckv.shape],
                                     output_dtypes=[dtype])
    ref = A.cache_rows_ref(ckv, w, 1e-6, Lw)
    f32 = mx.float32
    assert mx.array_equal(got[:, Lw:], ckv[:, Lw:])  # pe as it is
    scale = mx.abs(ref.astype(f32)[:, :Lw]).max(axis=-1, keepdims=True)
    tol = 1e-5 if dtype == f32 else 1e-2
    assert float((mx.abs(got.astype(f32)[:, :Lw] - ref.astype(f32)[:, :Lw]) / scale).max()) <= tol


@pytest.mark.gpu
def test_cache_rows_kernel_on_gpu():
    mx.random.seed(11)
    ckv = (mx.random.normal((3, 7, 576)) * 4).astype(mx.bfloat16)
    w = mx.random.uniform(0.5, 1.5, (512,)).astype(mx.bfloat16)
    got, ref = A.cache_rows_kernel(ckv, w, 1e-6, 512), A.cache_rows_ref(ckv, w, 1e-6, 512)
    assert mx.array_equal(got[..., 512:], ckv[..., 512:])
    f32 = mx.float32
    assert float(mx.abs(got.astype(f32) - ref.astype(f32)).max()) <= 1e-2 * float(mx.abs(ref.astype(f32)).max())


# -- the one-page decode kernels (chunks of rows, then their merge) ------------------------------------------


def page_inputs(B, H, N, W, seed, dtype=mx.float32):
    """Queries with one peaky head (scores in the hundreds), rows whose unused tail holds large junk."""
    r = np.random.default_rng(seed)
    qa = r.normal(size=(B, H, W)).astype(np.float32) * 0.3
    qa[:, 0] *= 40.0
    page = r.normal(size=(B, N, W)).astype(np.float32)
    return mx.array(qa).astype(dtype), mx.array(page).astype(dtype)


def _emulated(kind, monkeypatch):
    """Kernel launches run by the emulator on the generated `kind` text."""
    import metal_kernels

    monkeypatch.setattr(metal_kernels, "kernel", kernel_emulator.kernel_factory(kind))


def _close(got, ref, tol):
    """Largest difference within tol times the reference's largest magnitude (float32)."""
    f32 = mx.float32
    scale = float(mx.abs(ref.astype(f32)).max())
    return float(mx.abs(got.astype(f32) - ref.astype(f32)).max()) <= tol * scale


def _emulated_page_kernel(kind, monkeypatch, heads=2):
    """D.decode_page_kernel (the real wrapper: template, grid, threadgroup) with its launch run by the emulator."""
    _emulated(kind, monkeypatch)
    return partial(D.decode_page_kernel, heads=heads)


@pytest.mark.skipif(not kernel_emulator.available(), reason="g++ is not installed")
@pytest.mark.parametrize("kind", ["metal", "cuda"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("W,N,groups,chunk", [(64, 24, 2, 8), (72, 80, 1, 16), (72, 80, 2, 12)],
                         ids=["rows<threads", "rows>threads,ragged-cols", "ragged-last-chunk"])
def test_decode_page_kernel_text_runs_right_on_cpu(kind, dtype, W, N, groups, chunk, monkeypatch):
    """Ragged valid lengths (one row; a few; all but one; all: chunks without a valid row, chunks cut short), more
    rows than threads and a row width the threads do not divide, a last chunk past the page's end, a peaky head,
    junk past row 13 (large rows), two heads a threadgroup, two sequences."""
    qa, page = page_inputs(2, 4, N, W, seed=3, dtype=dtype)
    page = mx.concatenate([page[:, :14], 1e3 * mx.ones_like(page[:, 14:])], axis=1)
    for last in (0, 2, 13, N - 2, N - 1):
        lst = mx.array([last], mx.int32)
        got = _emulated_page_kernel(kind, monkeypatch)(qa, page, lst, groups=groups, chunk=chunk)
        ref = D.decode_page_ref(qa, page, lst)
        assert _close(got, ref, 2e-5 if dtype == mx.float32 else 1e-2), last


def test_decode_page_ref_is_attention_over_the_valid_rows():
    qa, page = page_inputs(1, 2, 9, 8, seed=4)
    got = D.decode_page_ref(qa, page, mx.array([4], mx.int32))
    p = mx.softmax(qa @ page[:, :5].swapaxes(-1, -2), axis=-1)
    assert float(mx.abs(got - p @ page[:, :5]).max()) < 1e-5


PE_SMALL = 6  # the decode routing tests' pe width (latent 58: rows of 64)


def decode_case(S, page_first):
    """A one-token decode after S cached rows in pages of page_first rows growing to 16 (two sequences): the
    query, up-projections, the decode slot, the cache with the new row written, and the S + 1 rows dense."""
    rows, q, k_up, v_up = inputs(2, 1, S + 1, seed=S, latent=58, pe=PE_SMALL)
    st = MLAState(page_first=page_first, page_max=16)
    st.append(rows[:, :S])
    slot = st.decode_slot()
    last = tuple(mx.put_along_axis(p, slot.row, r, axis=1) for p, r in zip(slot.pages[-1], (rows[:, S:],)))
    cache = kstate.LatentCache(slot.pages[:-1] + (last,), 0, 64)
    dq = mx.concatenate([cache.rows(p) for p in cache.pages], axis=1)[:, : S + 1]
    return q, k_up, v_up, slot, cache, dq


@pytest.mark.skipif(not kernel_emulator.available(), reason="g++ is not installed")
@pytest.mark.parametrize("absorb", [False, True])
@pytest.mark.parametrize("S", [1, 8, 9, 20])
def test_decode_takes_the_page_kernel_where_it_fits(monkeypatch, S, absorb):
    """mla_decode on a 'GPU' (the kernel's CUDA text emulated): one short unquantized page goes through the
    page kernel unless KIMI_MLX_MLA_PAGE=off, and the step equals the reference; two pages or a
    quantized page do not take it."""
    import kimi_mlx.ops.kda as kda_ops

    calls = []
    emulated = _emulated_page_kernel("cuda", monkeypatch, heads=1)

    def counted(qa, page, last):
        calls.append(page.shape)
        return emulated(qa, page, last)

    monkeypatch.setattr(kda_ops, "gpu_backend", lambda: "cuda")
    monkeypatch.setattr(D, "decode_page_kernel", counted)
    monkeypatch.setattr(D, "PAGE_KERNEL_HEADS", 1)
    q, k_up, v_up, slot, cache, dq = decode_case(S, page_first=8)
    kept = (A.absorb_matrix(k_up, PE_SMALL, SCALE), A.value_matrix(v_up, PE_SMALL)) if absorb else ()
    monkeypatch.setenv(D.PAGE_ENV, "off")
    D.mla_decode(q, cache, slot.row, k_up, v_up, SCALE, *kept)
    assert calls == []
    monkeypatch.delenv(D.PAGE_ENV)  # on by default
    out = D.mla_decode(q, cache, slot.row, k_up, v_up, SCALE, *kept)
    assert err(out, mla_attention_ref(q, dq, k_up, v_up, SCALE)) < 2e-5
    assert len(calls) == (1 if len(cache.pages) == 1 else 0)
    monkeypatch.setattr(D, "PAGE_KERNEL_ROWS", 4)
    calls.clear()
    D.mla_decode(q, cache, slot.row, k_up, v_up, SCALE, *kept)
    assert calls == [] or cache.pages[0][0].shape[1] <= 4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("N", [2048, D.PAGE_KERNEL_ROWS])
def test_decode_page_kernel_on_gpu(dtype, N):
    """The model's shape (32 heads, rows of 576, pages of 2,048 and of the most rows the kernels take) at ragged
    valid lengths."""
    qa, page = page_inputs(2, 32, N, 576, seed=5, dtype=dtype)
    for last in (0, 37, 3 * N // 4 - 5, N - 1):
        lst = mx.array([last], mx.int32)
        got, ref = D.decode_page_kernel(qa, page, lst), D.decode_page_ref(qa, page, lst)
        assert _close(got, ref, 2e-5 if dtype == mx.float32 else 1e-2), last


def chunk_scores(B, H, N, seed, dtype=mx.float32):
    """Scores with a peaky head (in the hundreds), a head of extreme spread, and junk-sized values."""
    r = np.random.default_rng(seed)
    s = r.normal(size=(B, H, N)).astype(np.float32) * 3.0
    s[:, 0] *= 100.0
    s[:, -1] = r.uniform(-3e4, 3e4, size=(B, N))
    return mx.array(s).astype(dtype)


@pytest.mark.skipif(not kernel_emulator.available(), reason="g++ is not installed")
@pytest.mark.parametrize("kind", ["metal", "cuda"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("N,chunk,groups", [(96, 32, 1), (80, 40, 2), (64, 16, 1)],
                         ids=["rows=threads", "rows<threads", "rows>threads-not"])
def test_decode_chunks_kernel_text_runs_right_on_cpu(kind, dtype, N, chunk, groups, monkeypatch):
    """Ragged valid lengths (row 0 only; mid-chunk; a chunk's last row; all): chunks with no valid row, cut
    chunks; extreme scores; two sequences; one and two lane groups."""
    _emulated(kind, monkeypatch)
    monkeypatch.setattr(D, "CHUNK_GROUPS", groups)
    s = chunk_scores(2, 3, N, seed=N, dtype=dtype)
    for last in (0, chunk // 2 + 1, chunk - 1, N - 1):
        lst = mx.array([last], mx.int32)
        got, ref = D.decode_chunks_kernel(s, lst, chunk), D.decode_chunks_ref(s, lst, chunk)
        assert got[0].dtype == dtype and got[0].shape == ref[0].shape == (2, N // chunk, 3, chunk)
        tol = 1e-6 if dtype == mx.float32 else 8e-3  # bf16: e rounded on either side of a rounding boundary
        assert _close(got[0], ref[0], tol), last
        assert mx.array_equal(got[1], ref[1]).item(), last  # the maxima: exactly the scores'
        assert _close(got[2], ref[2], 1e-5 if dtype == mx.float32 else 8e-3), last
        empty = (mx.arange(N // chunk) * chunk > last).reshape(1, -1, 1)
        assert mx.all(mx.where(empty, got[1] == D.LOW, got[1] > D.LOW)).item()


@pytest.mark.skipif(not kernel_emulator.available(), reason="g++ is not installed")
@pytest.mark.parametrize("kind", ["metal", "cuda"])
@pytest.mark.parametrize("pdt", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("W,groups", [(72, 1), (40, 2), (40, 8)], ids=["ragged-cols", "2-groups", "groups>chunks"])
def test_decode_merge_kernel_text_runs_right_on_cpu(kind, pdt, W, groups, monkeypatch):
    """Chunks with no valid row (LOW, total 0, junk parts), maxima far apart, parts in float32 or bf16."""
    _emulated(kind, monkeypatch)
    monkeypatch.setattr(D, "MERGE_GROUPS", groups)
    r = np.random.default_rng(W)
    B, K, H = 2, 5, 3
    most = r.normal(size=(B, K, H)).astype(np.float32) * 30.0
    most[:, 3:] = D.LOW  # two empty chunks at the end
    total = r.uniform(1.0, 50.0, size=(B, K, H)).astype(np.float32)
    total[:, 3:] = 0.0
    part = r.normal(size=(B, K, H, W)).astype(np.float32)
    part[:, 3:] = 1e30
    part = mx.array(part).astype(pdt)
    args = (part, mx.array(most), mx.array(total))
    for dtype in (mx.float32, mx.bfloat16):
        got, ref = D.decode_merge_kernel(*args, dtype), D.decode_merge_ref(*args, dtype)
        assert got.dtype == dtype and got.shape == (B, H, W)
        assert _close(got, ref, 1e-5 if dtype == mx.float32 else 1e-2)


@pytest.mark.parametrize("chunk", [4, 8, 24])
def test_chunk_refs_compose_to_attention(chunk):
    """decode_chunks_ref, the chunks' values and decode_merge_ref equal decode_page_ref at every valid length."""
    qa, page = page_inputs(2, 3, 24, 16, seed=chunk)
    B, N, W = page.shape
    s = qa @ page.swapaxes(-1, -2)
    for last in (0, 3, 5, 23):
        lst = mx.array([last], mx.int32)
        e, m, t = D.decode_chunks_ref(s, lst, chunk)
        got = D.decode_merge_ref(e @ page.reshape(B, N // chunk, chunk, W), m, t, mx.float32)
        assert err(got, D.decode_page_ref(qa, page, lst)) < 2e-5, last


@pytest.mark.skipif(not kernel_emulator.available(), reason="g++ is not installed")
@pytest.mark.parametrize("S", [3, 15, 16, 17, 40])
def test_decode_takes_the_split_kernels_for_long_or_several_pages(monkeypatch, S):
    """mla_decode on a 'GPU' (kernels' CUDA text emulated) with the page kernel's limit below the cache: one
    long page or several pages (a full earlier page unmasked, the last one cut at the new row) go through
    _decode_split and equal the reference; a quantized cache or KIMI_MLX_MLA_PAGE=off does not take it."""
    import kimi_mlx.ops.kda as kda_ops

    _emulated("cuda", monkeypatch)
    monkeypatch.setattr(kda_ops, "gpu_backend", lambda: "cuda")
    monkeypatch.setattr(D, "PAGE_KERNEL_ROWS", 2)
    monkeypatch.setattr(D, "SPLIT_ROWS", 8)
    calls = []
    split = D._decode_split
    monkeypatch.setattr(D, "_decode_split", lambda *a: calls.append(len(a[1].pages)) or split(*a))
    q, k_up, v_up, slot, cache, dq = decode_case(S, page_first=4)
    kept = (A.absorb_matrix(k_up, PE_SMALL, SCALE), A.value_matrix(v_up, PE_SMALL))
    out = D.mla_decode(q, cache, slot.row, k_up, v_up, SCALE, *kept)
    assert calls == [len(cache.pages)] and (S < 16 or len(cache.pages) > 1)
    assert err(out, mla_attention_ref(q, dq, k_up, v_up, SCALE)) < 2e-5
    monkeypatch.setenv(D.PAGE_ENV, "off")
    assert err(D.mla_decode(q, cache, slot.row, k_up, v_up, SCALE, *kept), out) < 2e-5
    assert calls == [len(cache.pages)]
    assert not D.split_kernels_fit(q[:, :, 0], kstate.LatentCache(cache.pages, 4, 64))  # quantized: the matmul path


@pytest.mark.gpu
@pytest.mark.parametrize("N", [16384, 131072])
def test_decode_chunks_and_merge_kernels_on_gpu(N):
    """The model's shape (32 heads, rows of 576, 512-row chunks) in bf16 at ragged valid lengths: each kernel
    against its twin, and the whole split decode against the page reference."""
    qa, page = page_inputs(1, 32, N, 576, seed=6, dtype=mx.bfloat16)
    s = qa @ page.swapaxes(-1, -2)
    for last in (0, 700, N // 2 + 3, N - 1):
        lst = mx.array([last], mx.int32)
        got, ref = D.decode_chunks_kernel(s, lst, 512), D.decode_chunks_ref(s, lst, 512)
        assert _close(got[0], ref[0], 8e-3) and _close(got[2], ref[2], 8e-3), last
        assert mx.array_equal(got[1], ref[1]).item(), last
        part = got[0] @ page.reshape(1, N // 512, 512, 576)
        assert _close(D.decode_merge_kernel(part, got[1], got[2], mx.bfloat16),
                      D.decode_merge_ref(part, got[1], got[2], mx.bfloat16), 1e-2), last
        whole = D._decode_split(qa, kstate.LatentCache(((page,),), 0, 64), lst)
        f32 = mx.float32  # the reference with the scores rounded to bf16 as the scores matmul leaves them
        p = mx.softmax(mx.where(mx.arange(N) <= last, s.astype(f32), -mx.inf), axis=-1, precise=True)
        assert _close(whole, (p @ page.astype(f32)).astype(mx.bfloat16), 2e-2), last
