"""The ragged batch's pieces: MLA decode (matmuls, page kernels, split kernels) with a valid length per sequence
equal to each sequence alone; BatchState's slots (join, leave, capacity and page growth and shrink) read back
exactly."""

import mlx.core as mx
import numpy as np
import pytest
from test_attention import _close, _emulated, chunk_scores, page_inputs

import kernel_emulator
from kimi_mlx.batch_state import BatchState, page_size
from kimi_mlx.feed import prefill
from kimi_mlx.ops import mla_decode as D
from kimi_mlx.state import LatentCache, MLAState


def alone(f, lasts, *arrays):
    """f over each sequence alone (its own last row), stacked."""
    return [f(*(a[b : b + 1] for a in arrays), mx.array([last], mx.int32)) for b, last in enumerate(lasts)]


@pytest.mark.skipif(not kernel_emulator.available(), reason="g++ is not installed")
@pytest.mark.parametrize("kind", ["metal", "cuda"])
def test_page_kernel_takes_a_last_row_per_sequence(kind, monkeypatch):
    _emulated(kind, monkeypatch)
    N, W = 40, 64
    lasts = [0, 13, N - 1]
    qa, page = page_inputs(3, 4, N, W, seed=5)
    lst = mx.array(lasts, mx.int32)
    got = D.decode_page_kernel(qa, page, lst, heads=2, groups=2, chunk=8)
    ref = D.decode_page_ref(qa, page, lst)
    for b, one in enumerate(alone(D.decode_page_ref, lasts, qa, page)):
        assert _close(ref[b : b + 1], one, 1e-6)
        assert _close(got[b : b + 1], one, 2e-5), b


@pytest.mark.skipif(not kernel_emulator.available(), reason="g++ is not installed")
@pytest.mark.parametrize("kind", ["metal", "cuda"])
def test_chunks_kernel_takes_a_last_row_per_sequence(kind, monkeypatch):
    _emulated(kind, monkeypatch)
    N, chunk = 64, 16
    lasts = [3, N - 1, 20]
    s = chunk_scores(3, 2, N, seed=7, dtype=mx.float32)
    lst = mx.array(lasts, mx.int32)
    got, ref = D.decode_chunks_kernel(s, lst, chunk), D.decode_chunks_ref(s, lst, chunk)
    ones = [D.decode_chunks_ref(s[b : b + 1], mx.array([last], mx.int32), chunk) for b, last in enumerate(lasts)]
    for i in range(3):
        assert mx.array_equal(ref[i], mx.concatenate([o[i] for o in ones])).item()
        assert _close(got[i], ref[i], 1e-5), i


@pytest.mark.parametrize("pages", [(32,), (16, 32)], ids=["one-page", "two-pages"])
def test_matmul_decode_masks_each_sequence_at_its_own_row(pages):
    """mla_decode's matmul path over pages whose last page holds each sequence's rows up to its own row."""
    B, H, W = 3, 2, 24
    r = np.random.default_rng(0)
    qa = mx.array(r.normal(size=(B, H, W)).astype(np.float32))
    cache = LatentCache(tuple((mx.array(r.normal(size=(B, n, W)).astype(np.float32)),) for n in pages))
    rows = [0, 7, pages[-1] - 1]
    got = D._decode_pages(qa, cache, mx.array(rows, mx.int32).reshape(-1, 1, 1), mx.float32)
    for b, row in enumerate(rows):
        one = LatentCache(tuple(tuple(a[b : b + 1] for a in p) for p in cache.pages))
        want = D._decode_pages(qa[b : b + 1], one, mx.array([row], mx.int32).reshape(1, 1, 1), mx.float32)
        assert _close(got[b : b + 1], want, 1e-6)


def test_page_sizes_follow_the_growth_sequence():
    assert [page_size(n) for n in (1, 256, 257, 16384, 16385, 40000)] == [256, 256, 512, 16384, 32768, 49152]


@pytest.fixture(scope="module")
def quantizable(hf_checkpoint):
    """A tiny model whose cache rows (122 + 6 wide) quantize."""
    from kimi_mlx.weights.load import load_model

    return load_model(hf_checkpoint("kkkmkm", kv_lora_rank=122, first_k_dense_replace=6)[1])


@pytest.mark.parametrize("bits", [0, 8])
def test_slots_join_leave_grow_and_shrink_and_read_back_exactly(demo_random, quantizable, bits):
    """Sequences of ragged lengths (one past a page) join a BatchState; each reads back (extract) as the state it
    joined with; slots leave without touching the others; capacity and page grow and shrink."""
    model = quantizable if bits else demo_random[0]
    batch = BatchState(model, max_batch=8)
    states = []
    for n in (5, 300, 1, 40, 17):
        s = model.new_state(1, cache_bits=bits)
        prefill(model, s, [3 + i % 200 for i in range(n)])  # ids inside every test model's vocabulary
        states.append(s)
    slots = [batch.add(s) for s in states]
    assert slots == [0, 1, 2, 3, 4] and batch.capacity == 8 and batch.rows == 512 and batch.lens[:5] == [5, 300, 1, 40, 17]

    def rows(mla):
        pages = mla.view().pages
        return [mx.concatenate(c, axis=1) for c in zip(*pages)] if pages else []

    def check():
        mark = batch.mark()
        for b, s in zip(slots, states):
            if b < batch.capacity and batch.used[b]:
                got = batch.extract(b, mark, s.offset)
                assert got.offset == s.offset
                for x, y in zip(got.layers, s.layers):
                    if isinstance(y, MLAState):
                        assert x.length == y.length and x.bits == y.bits
                        assert all(mx.array_equal(u, v).item() for u, v in zip(rows(x), rows(y)))
                    else:
                        assert mx.array_equal(x.conv, y.conv).item() and mx.array_equal(x.recurrent, y.recurrent).item()

    check()
    batch.free(1)  # the long one leaves: nothing is copied (the page still holds 512 rows, the capacity 8)
    batch.free(4)
    batch.prepare()
    assert batch.rows == 512 and batch.capacity == 8
    check()
    batch.free(3)
    batch.free(2)  # slot 0 alone: the slots shrink to a quarter (8 -> 2)
    batch.prepare()
    assert batch.capacity == 2 and batch.rows == 512
    check()
    long = model.new_state(1, cache_bits=bits)
    prefill(model, long, [3 + i % 200 for i in range(800)])
    states.append(long)
    slots.append(batch.add(long))
    batch.prepare()
    assert slots[-1] == 1 and batch.rows == 1024
    batch.free(1)  # the longest leaves: slot 0's 6 rows fit a page of 256, a quarter of 1,024: the page shrinks
    batch.prepare()
    assert batch.rows == 256
    check()


def test_bytes_with_predicts_the_batch_after_a_join(demo_random):
    """BatchState.bytes_with: the bytes after joining n sequences of a length, as the batch then holds them."""
    model, _ = demo_random
    batch = BatchState(model, max_batch=4)
    short, long = model.new_state(1), model.new_state(1)
    prefill(model, short, list(range(3, 13)))
    prefill(model, long, list(range(3, 303)))
    want = batch.bytes_with(short.offset)
    batch.add(short)
    batch.prepare()
    assert batch.nbytes == want
    want = batch.bytes_with(long.offset, n=2)
    batch.add(long)
    batch.add(long)
    batch.prepare()
    assert batch.nbytes == want and batch.capacity == 4 and batch.rows == 512


def test_compact_moves_slots_to_the_front_and_gives_memory_back(demo_random):
    """compact(): the occupied slots to the front in slot order, capacity and page cut to them; every slot reads
    back as before; the batch then holds layout_bytes of its layout; nothing changes when nothing would shrink."""
    from kimi_mlx.batch_state import layout_bytes, slots_for

    model, _ = demo_random
    batch = BatchState(model, max_batch=8)
    states = []
    for n in (5, 300, 9, 17, 3):
        s = model.new_state(1)
        prefill(model, s, [3 + i % 200 for i in range(n)])
        states.append(s)
        batch.add(s)
    batch.prepare()
    assert (batch.capacity, batch.rows) == (8, 512)
    assert batch.compact() is None  # nothing to shrink
    for b in (1, 3, 4):
        batch.free(b)
    before = batch.nbytes
    assert batch.compact() == [0, 2]
    assert (batch.capacity, batch.rows, batch.used, batch.lens) == (2, 256, [True, True], [5, 9])
    kda = sum(a.nbytes for s in batch.layers if not hasattr(s, "page") for a in (s.conv, s.recurrent)) // 2
    row = sum(a.nbytes for s in batch.layers if hasattr(s, "page") for a in s.page) // (2 * 256)
    assert batch.nbytes == layout_bytes(slots_for(2, 8), 9 + 1, kda, row) < before / 4
    mark = batch.mark()
    for b, s in ((0, states[0]), (1, states[2])):  # each slot continues exactly as its sequence alone
        got = batch.extract(b, mark, s.offset)
        want = s.snapshot()
        assert (got.offset, got.nbytes > 0) == (s.offset, True)
        assert mx.array_equal(model(mx.array([[7]]), got), model(mx.array([[7]]), want)).item()
    batch.free(0), batch.free(1)
    assert batch.compact() == [] and batch.nbytes == 0 and batch.capacity == 0


def test_restore_takes_the_batch_back_to_a_mark(demo_random):
    """restore(mark): after steps, each slot's KDA state and length as at the mark, so the same step again gives the
    same logits (the rows the MLA pages gained since lie past the lengths and are written over)."""
    model, _ = demo_random
    batch = BatchState(model, max_batch=4)
    for n in (7, 40):
        s = model.new_state(1)
        prefill(model, s, [3 + i % 200 for i in range(n)])
        batch.add(s)
    mark = batch.mark()
    toks = mx.array([[11], [12]], mx.uint32)

    def step(t):
        batch.prepare()
        out = model.decode_rows(t, batch)
        batch.advance()
        return out

    first = step(toks)
    step(mx.array([[13], [14]], mx.uint32))
    assert batch.lens == [9, 42]
    batch.restore(mark)
    assert batch.lens == [7, 40]
    assert mx.array_equal(step(toks), first).item()
