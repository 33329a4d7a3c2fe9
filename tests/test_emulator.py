"""The kernel emulator catches the bugs a GPU punishes: a real kernel's text with one planted bug (or a launch
with one planted mistake) fails, for both the Metal and the CUDA text where the kind of bug applies. The
unmutated kernels passing is the rest of the emulated suite (test_norm, test_kda, test_moe, ...)."""

import time

import mlx.core as mx
import numpy as np
import pytest

import kernel_emulator
from kimi_mlx.ops import kda as K
from kimi_mlx.ops import norm as N
from metal_kernels import generate

pytestmark = pytest.mark.skipif(not kernel_emulator.available(), reason="g++ is not installed")
KINDS = ["metal", "cuda"]


def plant(monkeypatch, name: str, old: str, new: str):
    """Kernel `name`'s body for both backends with its one occurrence of `old` replaced by `new`."""
    real = generate.body

    def body(kernel: str, kind: str) -> str:
        text = real(kernel, kind)
        if kernel == name:
            assert text.count(old) == 1, f"{old!r} is not once in {name}'s body: the planted bug would not be there"
            text = text.replace(old, new)
        return text

    monkeypatch.setattr(generate, "body", body)


def add_norm(kind, D=128, rows=5, seed=None):
    """add_norm over `rows` rows (one threadgroup a row, S = D / 64 lane groups meeting in threadgroup memory),
    with the outputs of its ops twin."""
    rng = np.random.default_rng(D + rows)
    h, a = (mx.array(rng.standard_normal((rows, D)).astype(np.float32)) for _ in range(2))
    w = mx.array(rng.uniform(0.5, 1.5, D).astype(np.float32))
    S = D // 64
    got = kernel_emulator.emulate("add_norm", kind, [h, a, w, mx.array([1e-6], mx.float32)], (("D", D), ("S", S)),
                                  grid=(32 * S, rows, 1), threadgroup=(32 * S, 1, 1),
                                  output_shapes=[h.shape, h.shape], output_dtypes=[mx.float32] * 2, seed=seed)
    return got, N.add_norm_ref(h, a, w, 1e-6)


def close(got, ref) -> bool:
    return float(mx.abs(got - ref).max()) <= 1e-5 * float(mx.abs(ref).max())


@pytest.mark.parametrize("kind", KINDS)
def test_the_unmutated_kernel_passes(kind):
    """The baseline the planted bugs below break: add_norm as it is, on every seed tried."""
    for seed in (1, 2, 3):
        (s, y), (rs, ry) = add_norm(kind, seed=seed)
        assert mx.array_equal(s, rs) and close(y, ry)


@pytest.mark.parametrize("kind", KINDS)
def test_a_read_of_threadgroup_memory_no_thread_wrote_fails(monkeypatch, kind):
    """Lane group 1 never writes its partial sum: every row's norm reads part[1] as junk (NaN), in every
    threadgroup (not zeros in the first and the previous row's value in the others)."""
    plant(monkeypatch, "add_norm", "if (lane == 0) {\n  part[g] = sq;", "if (lane == 0 && g != 1) {\n  part[g] = sq;")
    (s, y), (rs, _) = add_norm(kind)
    assert mx.array_equal(s, rs)  # the sum does not go through threadgroup memory
    assert bool(mx.isnan(y).all())


@pytest.mark.parametrize("kind", KINDS)
def test_a_missing_barrier_between_a_write_and_another_threads_read_fails(monkeypatch, kind):
    """Without the barrier, a thread may add up the lane groups' partial sums before another group's lane 0
    has written its own: under the shuffled order some rows come out wrong (with each seed tried)."""
    plant(monkeypatch, "add_norm", "gpu_barrier();\n", "")
    for seed in (1, 2, 3):
        (s, y), (rs, ry) = add_norm(kind, seed=seed)
        assert mx.array_equal(s, rs)
        assert not close(y, ry)


def intra_chunk(kind, seed=None):
    """kda_intra_chunk over 2 chunks of 16 rows, 16 key channels (2 slices through threadgroup memory), against
    its ops twin: (max relative error of the two outputs)."""
    from kimi_mlx.ops import kda_chunked

    M, C, Dk = 2, 16, 16
    rng = np.random.default_rng(3)
    q, k = (mx.array(0.3 * rng.standard_normal((M, C, Dk)).astype(np.float32)) for _ in range(2))
    g = mx.array(-np.abs(0.3 * rng.standard_normal((M, C, Dk))).astype(np.float32))
    beta = mx.array(rng.uniform(size=(M, C)).astype(np.float32))
    got = kernel_emulator.emulate("kda_intra_chunk", kind, [q, k, g, beta], (("DK", Dk), ("C", C)), grid=(256, M, 1),
                                  threadgroup=(256, 1, 1), output_shapes=[(M, C, C)] * 2,
                                  output_dtypes=[mx.float32] * 2, seed=seed)
    want = kda_chunked.intra_chunk(q, k, mx.exp(g), beta)
    return float(np.max([float(mx.abs(a - b).max()) / float(mx.abs(b).max()) for a, b in zip(got, want)]))  # NaN wins


@pytest.mark.parametrize("kind", KINDS)
def test_a_missing_barrier_after_loading_a_slice_fails(monkeypatch, kind):
    """kda_intra_chunk's group loads a slice of q, k, g (a value a thread) and then every thread reads the whole
    slice: without the barrier between, threads read slots others have not written yet (junk)."""
    assert intra_chunk(kind) <= 1e-4  # the kernel as it is
    plant(monkeypatch, "kda_intra_chunk", "  gpu_barrier();\n  for (int e = tid; e < LV * C * Q;",
          "  for (int e = tid; e < LV * C * Q;")
    for seed in (1, 2, 3):
        assert not intra_chunk(kind, seed) <= 1e-4  # NaN compares false


def intra_chunk_mma(kind, seed=None):
    """kda_intra_chunk_mma over 2 chunks of 32 rows (a tile below the diagonal, tile products on the emulated
    matrix units), 16 key channels, against its ops twin: (max relative error of the two outputs)."""
    from kimi_mlx.ops import kda_chunked

    M, C, Dk = 2, 32, 16
    rng = np.random.default_rng(4)
    q, k = (mx.array(0.3 * rng.standard_normal((M, C, Dk)).astype(np.float32)) for _ in range(2))
    g = mx.array(-np.abs(0.3 * rng.standard_normal((M, C, Dk))).astype(np.float32))
    beta = mx.array(rng.uniform(size=(M, C)).astype(np.float32))
    got = kernel_emulator.emulate("kda_intra_chunk_mma", kind, [q, k, g, beta], (("DK", Dk), ("C", C)),
                                  grid=(256, M, 1), threadgroup=(256, 1, 1), output_shapes=[(M, C, C)] * 2,
                                  output_dtypes=[mx.float32] * 2, seed=seed)
    want = kda_chunked.intra_chunk(q, k, mx.exp(g), beta)
    return float(np.max([float(mx.abs(a - b).max()) / float(mx.abs(b).max()) for a, b in zip(got, want)]))  # NaN wins


@pytest.mark.parametrize("kind", KINDS)
def test_a_tile_read_back_before_the_lane_groups_barrier_fails(monkeypatch, kind):
    """kda_intra_chunk_mma stores a 16x16 tile from the matrix units to threadgroup memory (each lane its share)
    and the lanes then read other lanes' entries: without the 32-lane group's barrier between, they read entries
    not yet written."""
    assert intra_chunk_mma(kind) <= 1e-4  # the kernel as it is
    plant(monkeypatch, "kda_intra_chunk_mma", "    gpu_simd_barrier();\n    for (int e = lane;",
          "    for (int e = lane;")
    for seed in (1, 2, 3):
        assert not intra_chunk_mma(kind, seed) <= 1e-4  # NaN compares false


def gated_norm(kind, rows, grid_x, tr):
    """kda_gated_norm (one 32-lane group a row of 64) launched over grid_x threads in threadgroups of 32 * tr."""
    rng = np.random.default_rng(rows)
    D = 64
    o = mx.array(rng.standard_normal((rows, D)).astype(np.float32))
    gate = mx.array(rng.standard_normal((rows, D)).astype(np.float32))
    w = mx.array(rng.uniform(0.5, 1.5, D).astype(np.float32))
    (got,) = kernel_emulator.emulate("kda_gated_norm", kind, [o, gate, w, mx.array([1e-5], mx.float32)], (("D", D),),
                                     grid=(grid_x, 1, 1), threadgroup=(32 * tr, 1, 1), output_shapes=[o.shape],
                                     output_dtypes=[mx.float32])
    return got, K.gated_norm_ref(o, gate, w, 1e-5, mx.float32)


def test_a_partial_threadgroup_runs_only_its_threads_on_metal():
    """5 rows in threadgroups of 4 rows: Metal runs 2 groups, the second of 1 row (its threads only), so the
    kernel, which does not check its row against the grid, is right."""
    got, ref = gated_norm("metal", rows=5, grid_x=32 * 5, tr=4)
    assert close(got, ref)


def test_a_partial_threadgroup_runs_whole_on_cuda_and_an_unguarded_write_raises():
    """The same launch on CUDA runs 2 whole blocks: the 3 rows past the grid write past the end of y."""
    with pytest.raises(RuntimeError, match="wrote past the end of output 'y'"):
        gated_norm("cuda", rows=5, grid_x=32 * 5, tr=4)


def test_a_partial_lane_group_reads_junk_from_the_lanes_that_do_not_exist_on_metal():
    """A grid 16 threads short of the rows' lanes: the last row's lane group has 16 lanes, whose simd_sum adds the
    16 missing lanes' junk (NaN), and its last 16 columns have no thread; the other rows are right."""
    got, ref = gated_norm("metal", rows=5, grid_x=32 * 5 - 16, tr=2)
    assert close(got[:4], ref[:4])
    assert bool(mx.isnan(got[4]).all())


def test_a_partial_threadgroups_barrier_counts_only_its_threads_on_metal():
    """add_norm with threadgroups twice as wide as a row's threads: each group holds only the row's 32 * S
    threads (the grid's edge), and its barrier releases when those arrive."""
    D, rows, S = 128, 3, 2
    rng = np.random.default_rng(0)
    h, a = (mx.array(rng.standard_normal((rows, D)).astype(np.float32)) for _ in range(2))
    w = mx.array(rng.uniform(0.5, 1.5, D).astype(np.float32))
    s, y = kernel_emulator.emulate("add_norm", "metal", [h, a, w, mx.array([1e-6], mx.float32)], (("D", D), ("S", S)),
                                   grid=(32 * S, rows, 1), threadgroup=(64 * S, 1, 1),
                                   output_shapes=[h.shape, h.shape], output_dtypes=[mx.float32] * 2)
    rs, ry = N.add_norm_ref(h, a, w, 1e-6)
    assert mx.array_equal(s, rs) and close(y, ry)


@pytest.mark.parametrize("kind", KINDS)
def test_threads_at_different_barriers_report_a_deadlock_quickly(monkeypatch, kind):
    """Lane 0 skips the simd_sum and goes on to the threadgroup barrier while lanes 1..31 wait for it in the
    sum's first shuffle: no barrier can release."""
    plant(monkeypatch, "add_norm", "sq = gpu_simd_sum(sq);", "if (lane != 0) sq = gpu_simd_sum(sq);")
    for rows in (1, 5):  # the first launch builds the text; the second is timed
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="deadlock: threads wait at different barriers"):
            add_norm(kind, rows=rows)
    assert time.monotonic() - start < 5
