"""MLA attention over the latent cache, in bounded memory for any cache length.

The cache holds, per token, the normed latent (L values) | k_pe (pe values): W = L + pe columns.
With per-head up-projections k_up [H, nope, L] and v_up [H, v, L], head h attends with
  score(t, s) = (q_nope[h,t] . k_up[h] latent[s] + q_pe[h,t] . k_pe[s]) * scale
  out[h, t]   = v_up[h] sum_s p(t, s) latent[s]
causally: query t of a call over T new tokens sits at position S - T + t and sees keys 0..S-T+t.

Two forms of the same math:
  expanded  K = [latent k_up^T | k_pe], V = latent v_up^T per head, for the keys being read;
  absorbed  q' = [q_nope k_up | q_pe] against the raw cache rows (one key head for all H heads),
            values are the latent rows and v_up is applied once to the result.
Absorbed costs H (W + L) per query-key pair, expanded H (nope + pe + v) plus H (W (nope + pe) + L v)
per key per call to expand it, so absorbed wins for short calls (decode) and expanded for prefill.

Three paths, chosen in `mla_attention` (KIMI_MLX_MLA overrides it for tests and benchmarks):
  ref    plain attention over the whole cache: one [B, H, T, S] score array (the reference twin)
  fused  mx.fast.scaled_dot_product_attention in the expanded form, taken only where the whole
         cache is one page and one [B, H, T, S] float32 score tile fits TILE_BYTES (MLX falls back
         to exactly that tile where no fused kernel takes these head dims). The absorbed form never
         takes it: SDPA broadcasts the one key head to all H query heads, while the tiled path folds
         the heads into query rows of one matmul (the cache rows read once for all heads).
  tiled  queries in chunks and keys in tiles of [B, H, query_chunk, tile_keys] float32 scores
         (<= TILE_BYTES, KIMI_MLX_MLA_TILE_MB, default 64 MB, 256 on a GPU) with an online softmax.
         mx.depends orders each tile after the previous one is folded in, and each tile is queued
         with async_eval while the one before is awaited, so the working set is a few tiles whatever
         S is (without both it grows with S: on CPU MLX allocates outputs ahead, a GPU queues every
         tile). One tile spans several cache pages when they fit.
  decode mla_decode: one query over whole pages with a mask (shape-stable, so the decoder compiles it);
         on a GPU one page of <= PAGE_KERNEL_ROWS rows runs as two kernels (decode_page_kernel, twin
         decode_page_ref: two launches where the matmul path runs eight), and longer or several pages as flash decoding
         with the two matmuls between kernels (_decode_split: decode_chunks_kernel and decode_merge_kernel,
         twins decode_chunks_ref and decode_merge_ref). KIMI_MLX_MLA_PAGE=off turns both off.
Quantized caches (see LatentCache.bits) always take the tiled path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache, partial

import mlx.core as mx
from metal_kernels import usable

from ..config import env_choice
from ..errors import ConfigError
from ..working_set import await_frees
from . import fast_math

ENV = "KIMI_MLX_MLA"
MODES = ("auto", "ref", "fused", "tiled")
TILE_ENV = "KIMI_MLX_MLA_TILE_MB"
PAGE_ENV = "KIMI_MLX_MLA_PAGE"  # on (default) | off: decode kernels on a GPU (page_kernel_fits, split_kernels_fit)


def tile_bytes_from_env() -> int:
    """KIMI_MLX_MLA_TILE_MB. Default 64 (256 keys x 2,048 queries x 32 heads at the real shape) on CPU,
    256 on a GPU, where fewer, larger tiles launch less per key and 256 keeps a step's working set near 1 GB
    (RESULTS.md times 64 to 1,024)."""
    default = "256" if mx.default_device() == mx.gpu else "64"
    value = os.environ.get(TILE_ENV, default).strip() or default
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{TILE_ENV}={value!r} is not a whole number of megabytes >= 1; unset it or fix it")
    return int(value) << 20


TILE_BYTES = tile_bytes_from_env()  # one float32 score tile
# memory a tiled call may hold above its start before it waits for MLX's frees (GPU only: MLX frees there on a
# worker thread, late). Two tiles in flight legitimately hold ~2.6 TILE_BYTES (bf16 scores and probabilities,
# values, expanded K and V), so the slack must stay above that
FREE_SLACK = 4 * TILE_BYTES if mx.default_device() == mx.gpu else None
MIN_TILE_KEYS = 256  # below this many keys per tile, chunk the queries instead


@dataclass(frozen=True)
class LatentCache:
    """Read-only view of the valid cache rows, as consecutive pages.

    Each page is (rows [B, n, W],) or, quantized, (wq, scales, biases) from mx.quantize of the rows
    with `bits` and `group_size` (groups run along W, so each token is quantized on its own).
    """

    pages: tuple[tuple[mx.array, ...], ...]
    bits: int = 0
    group_size: int = 64

    @property
    def length(self) -> int:
        return sum(p[0].shape[1] for p in self.pages)

    def rows(self, page: tuple[mx.array, ...]) -> mx.array:
        """A page's rows as a dense [B, n, W] array (dequantized if need be)."""
        if not self.bits:
            return page[0]
        return mx.dequantize(*page, group_size=self.group_size, bits=self.bits)

    def spans(self, stop: int, max_rows: int):
        """(start, page-slice) pieces of at most max_rows rows covering cache rows [0, stop)."""
        start = 0
        for page in self.pages:
            n = page[0].shape[1]
            for a in range(0, min(n, stop - start), max_rows):
                b = min(a + max_rows, n, stop - start)
                yield start + a, tuple(x[:, a:b] for x in page)
            start += n
            if start >= stop:
                return


@dataclass(frozen=True)
class Tiling:
    query_chunk: int
    tile_keys: int


CAUSAL_CHUNKS = 8  # query chunks for a call whose causal triangle is a large part of its scores
CAUSAL_MIN_T = 1024  # ... of at least this many queries


def choose_tiling(B: int, H: int, T: int, S: int, tile_bytes: int | None = None, causal: bool = False) -> Tiling:
    """The largest tiles whose [B, H, query_chunk, tile_keys] float32 scores fit tile_bytes (TILE_BYTES).

    causal: where the new queries are at least half the keys (a prompt's first steps), the scores past the
    causal diagonal are a large part of the block, so the queries go in CAUSAL_CHUNKS chunks, each reading
    only the keys up to its last query (9/16 of the scores for T = S; the MLA layer of a 2,048-token first
    step at the small shape on CPU: 590 -> 287 ms, where exp over the scores dominates). mla_attention asks
    for it where every key's expanded K and V fit a tile, so the chunks share one expansion."""
    tile_bytes = tile_bytes or TILE_BYTES
    rows = T
    if causal and T >= CAUSAL_MIN_T and 2 * T >= S:
        rows = -(-T // CAUSAL_CHUNKS)
    per_key = B * H * rows * 4
    keys = tile_bytes // per_key
    if keys >= MIN_TILE_KEYS or keys >= S:
        return Tiling(rows, max(1, min(keys, S)))
    keys = min(MIN_TILE_KEYS, S)
    return Tiling(max(1, tile_bytes // (B * H * keys * 4)), keys)


def absorbed_is_cheaper(T: int, latent: int, pe: int, nope: int, v: int) -> bool:
    """Per call, absorbed costs T S H (W + L); expanded costs T S H (nope + pe + v) + S H (W (nope + pe) + L v)
    (K from the raw rows with the augmented up-projection, V from the latent)."""
    W = latent + pe
    return T * (W + latent - nope - pe - v) <= W * (nope + pe) + latent * v


def mode() -> str:
    return env_choice(ENV, MODES, "auto")


def mla_attention(q, cache: LatentCache, k_up, v_up, scale: float, *, path: str | None = None,
                  absorbed: bool | None = None, tiling: Tiling | None = None) -> mx.array:
    """Causal MLA attention of T new queries over the whole cache (which already holds them).

    q: [B, H, T, nope + pe]; k_up: [H, nope, L]; v_up: [H, v, L].  Returns [B, H, T, v] in q's dtype.
    path: 'ref' | 'fused' | 'tiled' (None: KIMI_MLX_MLA, then the rule in the module docstring).
    """
    B, H, T, _ = q.shape
    S = cache.length
    _, nope, L = k_up.shape
    pe = q.shape[-1] - nope
    if absorbed is None:
        absorbed = absorbed_is_cheaper(T, L, pe, nope, v_up.shape[1])
    path = path or mode()
    if path == "auto":
        fits = B * H * T * S * 4 <= TILE_BYTES
        path = "fused" if fits and not absorbed and len(cache.pages) == 1 and not cache.bits else "tiled"
    if path == "ref":
        return mla_attention_ref(q, mx.concatenate([cache.rows(p) for p in cache.pages], axis=1), k_up, v_up, scale)
    if path == "fused":
        if cache.bits:
            raise ValueError("the fused path reads a dense cache; quantized caches take the tiled path")
        return _fused(q, mx.concatenate([p[0] for p in cache.pages], axis=1), k_up, v_up, scale, absorbed)
    if path != "tiled":
        raise ValueError(f"unknown MLA attention path {path!r}")
    # expanded K and V of every key, if small enough to build once for chunks of queries to share
    expandable = not absorbed and B * H * S * (q.shape[-1] + v_up.shape[1] + ONES) * q.itemsize <= TILE_BYTES
    tiling = tiling or choose_tiling(B, H, T, S, causal=expandable)
    return _tiled(q, cache, k_up, v_up, scale, absorbed, tiling, expand_all=expandable and tiling.query_chunk < T)


SPLIT_ROWS = 512  # decode: a page's values matmul runs as a batch of SPLIT_ROWS-row pieces (split-K; 0: off) ...
SPLIT_MIN_ROWS = 4096  # ... from this many rows a page (below, the pieces' transpose, cast and sum cost more
#                        launches than the matmul they spread, and one page holds a short context)


def mla_decode(q, cache: LatentCache, row: mx.array, k_up, v_up, scale: float, absorb=None,
               values=None) -> mx.array:
    """One query per sequence over whole cache pages: every row of the pages but the last (which must be
    wholly valid), and the last page's rows up to `row` (an int32 array of one element: the new token's row
    in the last page).

    The shape-stable twin of the absorbed tiled path for T = 1: it reads every row of the pages it is
    given (MLAState.decode_slot keeps the last page's unused rows few) and masks the last page's rows past
    `row` (an array, so a compiled step keeps one graph while the cache grows). A page of SPLIT_MIN_ROWS or
    more has its values matmul (32 heads x rows x 576) split into SPLIT_ROWS-row pieces run as one batched
    matmul and summed, so a long page spreads over the card instead of a handful of output tiles.
    q: [B, H, 1, nope + pe] -> [B, H, 1, v].
    absorb, values: absorb_matrix(k_up, pe, scale) and value_matrix(v_up, pe), if the caller keeps them:
    the absorbed query is then one matmul (no slices, concatenation or scaling of the query) and the values
    read the whole latent | pe rows (no slice of them copied). Both are kept with their output rows first, so
    each of those matmuls is a batched matrix-vector product, which MLX's CUDA backend runs with its own gemv
    kernel rather than through cuBLAS (~19 us of host time a call, the most of any launch in a decoded token).
    """
    B, H, _, _ = q.shape
    L = k_up.shape[2]
    qa = (q @ absorb.swapaxes(-1, -2) if absorb is not None else _absorb(q, k_up) * scale).reshape(B, H, -1)
    if page_kernel_fits(qa, cache):
        o = decode_page_kernel(qa, cache.pages[0][0], row)
    elif split_kernels_fit(qa, cache):
        o = _decode_split(qa, cache, row)
    else:
        o = _decode_pages(qa, cache, row, q.dtype).astype(q.dtype)
    o = o[:, :, None]
    return o @ values.swapaxes(-1, -2) if values is not None else o[..., :L] @ v_up.swapaxes(-1, -2)


def _decode_pages(qa, cache: LatentCache, row: mx.array, dtype) -> mx.array:
    """mla_decode's attention over whole pages as matmuls, probabilities in dtype: qa [B, H, W] -> [B, H, W]
    (float32 when several pages are summed)."""
    gs, bits = cache.group_size, cache.bits
    if bits:
        parts = [mx.quantized_matmul(qa, *p, transpose=True, group_size=gs, bits=bits) for p in cache.pages]
    else:
        parts = [qa @ p[0].swapaxes(-1, -2) for p in cache.pages]
    parts[-1] = mx.where(positions(parts[-1].shape[-1]) <= row.reshape(1, 1, 1), parts[-1], -mx.inf)
    s = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)  # [B, H, capacity]
    p = fast_math.softmax(s)  # float32 inside, probabilities in the cache dtype
    o, off = None, 0
    wide = len(cache.pages) > 1  # several pages' values are summed in float32
    for page in cache.pages:
        n = page[0].shape[1]
        part = _page_values(p[..., off : off + n].astype(dtype), page, bits, gs, wide)
        o = part if o is None else o + part
        off += n
    return o


def split_kernels_fit(qa, cache: LatentCache) -> bool:
    """Whether mla_decode runs as _decode_split: on a GPU (unless KIMI_MLX_MLA_PAGE=off or KIMI_MLX_MLA=ref),
    unquantized pages in the query's dtype, each a whole number of chunks of min(SPLIT_ROWS, its rows).
    Four launches a page against the matmul path's eight, the scores read once by the chunk kernel (RESULTS.md
    times both from 16k to 131k rows)."""
    return (SPLIT_ROWS > 0 and _decode_kernels_allowed(qa, cache) and usable("mla_decode_chunks")
            and all(p[0].shape[1] % min(SPLIT_ROWS, p[0].shape[1]) == 0 for p in cache.pages))


def probe_split_kernels(cfg, dtype) -> None:
    """Run the long-page decode kernels (mla_decode_chunks, mla_decode_merge) once at the model's shapes, over two
    pages of SPLIT_ROWS rows of zeros, where split_kernels_fit takes them (Model.probe_kernels: a short probe
    never reaches a long page)."""
    W = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    qa = mx.zeros((1, cfg.num_attention_heads, W), dtype)
    page = (mx.zeros((1, SPLIT_ROWS, W), dtype),)
    cache = LatentCache((page, page))
    if split_kernels_fit(qa, cache):
        mx.eval(_decode_split(qa, cache, mx.zeros((1,), mx.int32)))


def _decode_kernels_allowed(qa, cache: LatentCache) -> bool:
    """What both decode kernel paths need: a GPU, KIMI_MLX_MLA_PAGE=on and KIMI_MLX_MLA not ref, an unquantized
    cache whose pages hold the query's dtype."""
    from .kda import gpu_backend

    return (not cache.bits and page_mode() == "on" and mode() != "ref" and gpu_backend() is not None
            and usable("mla_decode_merge")
            and all(p[0].dtype == qa.dtype for p in cache.pages))


def _decode_split(qa, cache: LatentCache, row: mx.array) -> mx.array:
    """mla_decode's attention over pages as flash decoding with the matmuls on the tensor cores: per page, the
    scores matmul, decode_chunks_kernel (each chunk's masked softmax weights, unnormalized), the chunks' values
    as one batched matmul; then decode_merge_kernel over every page's chunks. qa [B, H, W] -> [B, H, W] in
    qa's dtype. Four launches a page (plus a concatenation of the chunk results where there are several pages)
    against the matmul path's eight, and no pass over [B, H, rows] scores but the chunk kernel's."""
    B, H, W = qa.shape
    parts, most, total = [], [], []
    for i, (rows,) in enumerate(cache.pages):
        n = rows.shape[1]
        c = min(SPLIT_ROWS, n)
        last = row if i == len(cache.pages) - 1 else positions(n)[n - 1 :]  # earlier pages are wholly valid
        e, m, t = decode_chunks_kernel(qa @ rows.swapaxes(-1, -2), last, c)
        parts.append(e @ rows.reshape(B, n // c, c, W))  # [B, chunks, H, W]
        most.append(m)
        total.append(t)

    def join(xs):
        return xs[0] if len(xs) == 1 else mx.concatenate(xs, axis=1)

    return decode_merge_kernel(join(parts), join(most), join(total), qa.dtype)


PAGE_KERNEL_ROWS = 8192  # decode takes the page kernels up to this many cache rows: below it their two launches
#                         beat the matmul path's eight; above it their arithmetic on CUDA cores outgrows the
#                         split path's matmuls on the tensor cores (RESULTS.md: both timed at 1k-8k rows)
PAGE_KERNEL_HEADS = 8  # heads a threadgroup of mla_decode_page serves (HG; their queries in threadgroup memory)
PAGE_KERNEL_GROUPS = 4  # 32-lane groups a threadgroup of mla_decode_page (NW)
PAGE_CHUNK_ROWS = 64  # rows a threadgroup of mla_decode_page takes (R): 16 chunks x 4 head groups at 1,024 rows
MERGE_GROUPS = 8  # 32-lane groups a threadgroup of mla_decode_merge (each over every 8th chunk of 32 columns)
CHUNK_GROUPS = 4  # 32-lane groups a threadgroup of mla_decode_chunks (4 of a 512-row chunk's scores a thread)
LOW = -3.0e38  # the kernels' "no valid row" maximum


def page_mode() -> str:
    return env_choice(PAGE_ENV, ("on", "off"), "on")


def page_kernel_fits(qa, cache: LatentCache) -> bool:
    """Whether mla_decode runs as decode_page_kernel: on a GPU (unless KIMI_MLX_MLA_PAGE=off or
    KIMI_MLX_MLA=ref), one unquantized page of at most PAGE_KERNEL_ROWS rows in the query's dtype, whose head
    groups' queries and chunk scores fit in 24 KB of threadgroup memory (Metal allows 32)."""
    B, H, W = qa.shape
    return (len(cache.pages) == 1 and _decode_kernels_allowed(qa, cache) and usable("mla_decode_page")
            and cache.pages[0][0].shape[1] <= PAGE_KERNEL_ROWS and H % PAGE_KERNEL_HEADS == 0
            and (W + PAGE_CHUNK_ROWS) * PAGE_KERNEL_HEADS * 4 <= 24 * 1024)


def decode_page_ref(qa, page, last) -> mx.array:
    """softmax(qa . rows[:last + 1]) @ rows[:last + 1] per head, float32 inside, in qa's dtype: the twin of
    decode_page_kernel. qa [B, H, W] (absorbed, pre-scaled), page [B, N, W], last int32 (one element) -> [B, H, W]."""
    f32 = mx.float32
    rows = page.astype(f32)
    s = qa.astype(f32) @ rows.swapaxes(-1, -2)  # [B, H, N]
    s = mx.where(mx.arange(page.shape[1]) <= last.reshape(()), s, -mx.inf)
    return (mx.softmax(s, axis=-1, precise=True) @ rows).astype(qa.dtype)


def decode_page_kernel(qa, page, last, heads: int = PAGE_KERNEL_HEADS, groups: int = PAGE_KERNEL_GROUPS,
                       chunk: int = PAGE_CHUNK_ROWS) -> mx.array:
    """decode_page_ref as two kernels (metal_kernels/mla_decode_page.body and mla_decode_merge.body): chunks of
    `chunk` rows for `heads` heads a threadgroup, then their softmax pieces combined per head."""
    from metal_kernels import kernel

    B, H, W = qa.shape
    N = page.shape[1]
    K = -(-N // chunk)
    f32 = mx.float32
    part, most, total = kernel("mla_decode_page")(
        inputs=[qa, page, last.astype(mx.int32)],  # read as last[0]: any shape of one element
        template=[("H", H), ("W", W), ("HG", heads), ("NW", groups), ("R", chunk), ("N", N), ("K", K)],
        grid=(32 * groups, K * (H // heads), B), threadgroup=(32 * groups, 1, 1),
        output_shapes=[(B, K, H, W), (B, K, H), (B, K, H)], output_dtypes=[f32, f32, f32],
    )
    return decode_merge_kernel(part, most, total, qa.dtype)


def decode_merge_ref(part, most, total, dtype) -> mx.array:
    """Chunks of a softmax combined per head: sum_k w_k part_k / sum_k w_k total_k, w_k = exp(most_k - max_k
    most_k), float32 inside, in dtype (the twin of decode_merge_kernel). part [B, K, H, W], most and total
    [B, K, H] -> [B, H, W]."""
    f32 = mx.float32
    w = mx.exp(most - most.max(axis=1, keepdims=True))  # [B, K, H]
    o = (w[..., None] * part.astype(f32)).sum(axis=1) / (w * total).sum(axis=1)[..., None]
    return o.astype(dtype)


def decode_merge_kernel(part, most, total, dtype) -> mx.array:
    """decode_merge_ref as one kernel (metal_kernels/mla_decode_merge.body): a threadgroup 32 columns of a head."""
    from metal_kernels import kernel

    B, K, H, W = part.shape
    T = 32 * MERGE_GROUPS
    (o,) = kernel("mla_decode_merge")(
        inputs=[part, most, total],
        template=[("H", H), ("W", W), ("K", K), ("NW", MERGE_GROUPS)],
        grid=(T, H * -(-W // 32), B), threadgroup=(T, 1, 1),
        output_shapes=[(B, H, W)], output_dtypes=[dtype],
    )
    return o


def decode_chunks_ref(s, last, chunk: int):
    """Per chunk of `chunk` rows and head of scores s [B, H, N] (rows past `last` masked): e = exp(s - m) in s's
    dtype [B, K, H, chunk] with m the chunk's largest valid score (LOW where it has none, e 0), m and the sum of
    the rounded e, float32 [B, K, H]. The twin of decode_chunks_kernel."""
    B, H, N = s.shape
    K = N // chunk
    f32 = mx.float32
    x = s.astype(f32).reshape(B, H, K, chunk).transpose(0, 2, 1, 3)
    valid = (mx.arange(N, dtype=mx.int32) <= last.reshape(())).reshape(K, 1, chunk)
    m = mx.where(valid, x, LOW).max(axis=-1)
    e = mx.where(valid, mx.exp(x - m[..., None]), 0.0).astype(s.dtype)
    return e, m, e.astype(f32).sum(axis=-1)


def decode_chunks_kernel(s, last, chunk: int):
    """decode_chunks_ref as one kernel (metal_kernels/mla_decode_chunks.body): a threadgroup a chunk of a head."""
    from metal_kernels import kernel

    B, H, N = s.shape
    K = N // chunk
    f32 = mx.float32
    T = 32 * CHUNK_GROUPS
    return kernel("mla_decode_chunks")(
        inputs=[s, last.astype(mx.int32)],
        template=[("H", H), ("N", N), ("C", chunk), ("K", K), ("NW", CHUNK_GROUPS)],
        grid=(T, K * H, B), threadgroup=(T, 1, 1),
        output_shapes=[(B, K, H, chunk), (B, K, H), (B, K, H)], output_dtypes=[s.dtype, f32, f32],
    )


def absorb_matrix(k_up, pe: int, scale: float) -> mx.array:
    """[H, L + pe, nope + pe] in k_up's dtype: k_up^T beside an identity over the pe columns, times scale, so
    q @ absorb_matrix^T = [q_nope k_up | q_pe] * scale (the absorbed, pre-scaled query) in one matmul."""
    H, nope, L = k_up.shape
    f32 = mx.float32
    top = mx.concatenate([k_up.astype(f32).swapaxes(-1, -2), mx.zeros((H, L, pe), f32)], axis=-1)
    bottom = mx.broadcast_to(mx.concatenate([mx.zeros((pe, nope), f32), mx.eye(pe, dtype=f32)], axis=-1),
                             (H, pe, nope + pe))
    return mx.contiguous((mx.concatenate([top, bottom], axis=1) * scale).astype(k_up.dtype))


def value_matrix(v_up, pe: int) -> mx.array:
    """[H, v, L + pe]: v_up beside zero columns for the pe part, so (p @ cache rows) @ value_matrix^T
    = (p @ latent rows) v_up^T without slicing the latent out of the rows."""
    H, v, L = v_up.shape
    return mx.concatenate([v_up, mx.zeros((H, v, pe), v_up.dtype)], axis=-1)


@lru_cache(maxsize=4)
def positions(n: int) -> mx.array:
    """arange(n) int32 on the device, made once per last-page size: the decode mask's positions (an arange in
    a compiled step is a kernel every token) and, sliced, the new row's index (MLAState.decode_slot)."""
    pos = mx.arange(n, dtype=mx.int32)
    mx.eval(pos)
    return pos


def _page_values(p, page, bits, gs, wide: bool):
    """p [B, H, n] @ page rows [B, n, W] -> [B, H, W], float32 if wide or split into pieces, else p's dtype."""
    B, H, n = p.shape
    c = SPLIT_ROWS
    if bits:
        o = mx.quantized_matmul(p, *page, transpose=False, group_size=gs, bits=bits)
    elif not c or n < max(2 * c, SPLIT_MIN_ROWS) or n % c:
        o = p @ page[0]
    else:
        k = n // c
        pieces = p.reshape(B, H, k, c).transpose(0, 2, 1, 3) @ page[0].reshape(B, k, c, -1)  # [B, k, H, W]
        return pieces.astype(mx.float32).sum(1)
    return o.astype(mx.float32) if wide else o


def cache_rows_ref(ckv, weight, eps: float, L: int) -> mx.array:
    """The latent cache's rows from the kv_a projection [..., L + pe]: rms_norm(latent) | pe, in ckv's dtype."""
    return mx.concatenate([mx.fast.rms_norm(ckv[..., :L], weight.astype(ckv.dtype), eps), ckv[..., L:]], axis=-1)


def cache_rows_kernel(ckv, weight, eps: float, L: int) -> mx.array:
    """cache_rows_ref as one kernel (metal_kernels/mla_cache_row.body); L a multiple of 32."""
    from metal_kernels import group_rows, kernel

    W = ckv.shape[-1]
    rows = ckv.size // W
    (out,) = kernel("mla_cache_row")(
        inputs=[ckv, weight.astype(ckv.dtype), mx.array([eps], mx.float32)], template=[("L", L), ("W", W)],
        grid=(32 * rows, 1, 1), threadgroup=(32 * group_rows(rows, 4), 1, 1),
        output_shapes=[ckv.shape], output_dtypes=[ckv.dtype],
    )
    return out


def cache_rows(ckv, weight, eps: float, L: int) -> mx.array:
    """The kernel on a GPU (unless KIMI_MLX_MLA=ref), else the ops."""
    from .kda import gpu_backend

    if mode() != "ref" and gpu_backend() and L % 32 == 0 and usable("mla_cache_row"):
        return cache_rows_kernel(ckv, weight, eps, L)
    return cache_rows_ref(ckv, weight, eps, L)


def mla_attention_ref(q, rows, k_up, v_up, scale: float) -> mx.array:
    """Plain expanded attention over dense cache rows [B, S, W]: the reference twin."""
    B, H, T, _ = q.shape
    S = rows.shape[1]
    nope, L = k_up.shape[1], k_up.shape[2]
    f32 = mx.float32
    lat = rows[:, None, :, :L].astype(f32)
    k = lat @ k_up.astype(f32).swapaxes(-1, -2)  # [B, H, S, nope]
    v = lat @ v_up.astype(f32).swapaxes(-1, -2)  # [B, H, S, v]
    qf = q.astype(f32)
    s = qf[..., :nope] @ k.swapaxes(-1, -2) + qf[..., nope:] @ rows[:, None, :, L:].astype(f32).swapaxes(-1, -2)
    visible = mx.arange(S)[None, :] <= (S - T + mx.arange(T))[:, None]
    s = mx.where(visible, s * scale, -mx.inf)
    return (mx.softmax(s, axis=-1) @ v).astype(q.dtype)


def _absorb(q, k_up):
    """[q_nope k_up | q_pe]: [B, H, T, L + pe]."""
    nope = k_up.shape[1]
    return mx.concatenate([q[..., :nope] @ k_up, q[..., nope:]], axis=-1)


def _fused(q, rows, k_up, v_up, scale, absorbed):
    B, H, T, _ = q.shape
    S = rows.shape[1]
    L = k_up.shape[2]
    mask = "causal" if T > 1 else None
    if absorbed:
        cache = rows[:, None]
        o = mx.fast.scaled_dot_product_attention(_absorb(q, k_up), cache, cache[..., :L], scale=scale, mask=mask)
        return o @ v_up.swapaxes(-1, -2)
    lat = rows[:, None, :, :L]
    k = mx.concatenate(
        [lat @ k_up.swapaxes(-1, -2), mx.broadcast_to(rows[:, None, :, L:], (B, H, S, rows.shape[-1] - L))], axis=-1
    )
    return mx.fast.scaled_dot_product_attention(q, k, lat @ v_up.swapaxes(-1, -2), scale=scale, mask=mask)


class _Absorbed:
    """Scores and values against raw cache rows (quantized rows are read by quantized_matmul)."""

    def __init__(self, q, cache: LatentCache, k_up, v_up, scale):
        self.cache, self.v_up, self.L = cache, v_up, k_up.shape[2]
        self.qa = _absorb(q, k_up) * scale  # [B, H, T, W], pre-scaled like MLX's SDPA does

    def queries(self, t0, t1):
        B, H, _, W = self.qa.shape
        self.q2 = self.qa[:, :, t0:t1].reshape(B, H * (t1 - t0), W)
        self.shape = (B, H, t1 - t0)

    def scores(self, start, span):
        """(scores [B, H, t, n] in the cache dtype, what values() needs of this span); start: its first key."""
        if self.cache.bits:
            s = mx.quantized_matmul(self.q2, *span, transpose=True, group_size=self.cache.group_size,
                                    bits=self.cache.bits)
        else:
            s = self.q2 @ span[0].swapaxes(-1, -2)
        return s.reshape(*self.shape, -1), span

    def values(self, p, span):
        """(p @ latent rows, p's row sums), float32 [B, H, t, L] and [B, H, t, 1]."""
        p = p.reshape(p.shape[0], -1, p.shape[-1]).astype(self.qa.dtype)
        if self.cache.bits:
            o = mx.quantized_matmul(p, *span, transpose=False, group_size=self.cache.group_size, bits=self.cache.bits)
            row_sums = p.astype(mx.float32).sum(-1, keepdims=True)
            return o[..., : self.L].astype(mx.float32).reshape(*self.shape, self.L), row_sums.reshape(*self.shape, 1)
        o = p @ _ones_column(span[0][..., : self.L])
        return _split_sum(o.astype(mx.float32).reshape(*self.shape, self.L + ONES))

    def finish(self, o):
        return o.astype(self.qa.dtype) @ self.v_up.swapaxes(-1, -2)


class _Expanded:
    """Scores and values against per-head K and V expanded from each span of the cache.

    K comes from one matmul of the raw rows with k_aug[h] = [[k_up[h], 0], [0, I_pe]], so it holds
    [latent k_up[h]^T | k_pe] and the scores are one matmul of the 192-dim queries (not a separate pe matmul
    added onto the nope scores: one more pass over the scores, slower, RESULTS.md). With `expand_all` (a call whose
    queries go in chunks over a short cache) every key is expanded once up front and the chunks read
    slices of it; otherwise each span is expanded when read (a long cache never is whole)."""

    def __init__(self, q, cache: LatentCache, k_up, v_up, scale, expand_all=False):
        self.q, self.cache, self.v_up = q * scale, cache, v_up
        H, nope, L = k_up.shape
        pe = q.shape[-1] - nope
        top = mx.concatenate([k_up, mx.zeros((H, nope, pe), k_up.dtype)], axis=-1)
        bottom = mx.broadcast_to(mx.concatenate([mx.zeros((pe, L), k_up.dtype), mx.eye(pe, dtype=k_up.dtype)], axis=-1),
                                 (H, pe, L + pe))
        self.k_aug_t = mx.concatenate([top, bottom], axis=1).swapaxes(-1, -2)  # [H, W, nope + pe]
        self.L = L
        self.kv = None
        if expand_all:
            rows = mx.concatenate([cache.rows(p) for p in cache.pages], axis=1)[:, None]
            self.kv = self._expand(rows)

    def _expand(self, rows):
        """Cache rows [B, 1, n, W] -> (K [B, H, n, nope + pe], V with ONES columns of ones [B, H, n, v + ONES])."""
        return rows @ self.k_aug_t, _ones_column(rows[..., : self.L] @ self.v_up.swapaxes(-1, -2))

    def queries(self, t0, t1):
        self.qc = self.q[:, :, t0:t1]

    def scores(self, start, span):
        n = span[0].shape[1]
        k, v = (x[:, :, start : start + n] for x in self.kv) if self.kv else self._expand(self.cache.rows(span)[:, None])
        return self.qc @ k.swapaxes(-1, -2), v

    def values(self, p, v):
        return _split_sum((p.astype(v.dtype) @ v).astype(mx.float32))

    def finish(self, o):
        return o.astype(self.q.dtype)


ONES = 16  # columns of ones beside the values: p @ [v | 1...] gives p's row sums; 16 keeps N aligned


def _ones_column(v):
    """[..., n, d] -> [..., n, d + ONES] with ONES columns of ones: p @ it also gives p's row sums, summed
    in the matmul's float32 accumulator (a reduction over bf16 would add up in bf16). ONES pads the width to a
    size the matmul kernels tile well: one column alone (N = d + 1) fell off them (RESULTS.md)."""
    return mx.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, ONES)], constant_values=1)


def _split_sum(o):
    return o[..., :-ONES], o[..., -1:]


def _tiled(q, cache: LatentCache, k_up, v_up, scale, absorbed, tiling: Tiling, expand_all=False):
    """Online softmax over key tiles, query chunk by query chunk; float32 running max, sum and output."""
    B, H, T, _ = q.shape
    S = cache.length
    form = _Absorbed(q, cache, k_up, v_up, scale) if absorbed else _Expanded(q, cache, k_up, v_up, scale, expand_all)
    outs, pending = [], None
    limit = None if FREE_SLACK is None else mx.get_active_memory() + FREE_SLACK
    for t0 in range(0, T, tiling.query_chunk):
        t1 = min(T, t0 + tiling.query_chunk)
        form.queries(t0, t1)
        first_q, last_q = S - T + t0, S - T + t1 - 1  # absolute positions of this chunk's queries
        q_pos = mx.arange(first_q, last_q + 1)[:, None]
        m = l = acc = None
        spans = list(cache.spans(last_q + 1, tiling.tile_keys))
        for tile in _group(spans, tiling.tile_keys):
            # read this tile only after the previous one is folded in (else MLX may compute tiles ahead)
            after = [acc, l] if m is not None else outs[-1:]
            if after:
                tile = [(start, tuple(mx.depends(list(span), after))) for start, span in tile]
            parts, ctxs = zip(*(form.scores(start, span) for start, span in tile))
            s = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)  # cache dtype
            k0 = tile[0][0]
            k1 = k0 + s.shape[-1]
            if k1 - 1 > first_q:  # some key lies after some query of this chunk
                s = mx.where(mx.arange(k0, k1)[None, :] <= q_pos, s, -mx.inf)
            m_tile = s.max(-1, keepdims=True).astype(mx.float32)
            m_new = m_tile if m is None else mx.maximum(m, m_tile)
            p = _probs(s, m_new)
            pv, off = None, 0
            for part_s, ctx in zip(parts, ctxs):
                n = part_s.shape[-1]
                part, part_sum = form.values(p[..., off : off + n], ctx)
                pv, p_sum = (part, part_sum) if pv is None else (pv + part, p_sum + part_sum)
                off += n
            l, acc = (p_sum, pv) if m is None else _fold(m, m_new, l, p_sum, acc, pv)
            m = m_new
            # at most two tiles in flight: queue this one, wait for the one before (a GPU queues every
            # tile of a long context ahead otherwise, each tile's memory held until it runs)
            mx.async_eval(m, l, acc)
            if pending is not None:
                mx.eval(pending)
                if limit is not None:
                    limit = await_frees(limit, TILE_BYTES)
            pending = [m, l, acc]
        outs.append(form.finish(acc / l))
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)


def _probs(s, m):
    """exp(s - m) computed in float32 and stored in the scores' dtype (the dtype the values matmul takes;
    bf16 halves the tile's traffic): one fused pass over the score tile, or on the CPU fast_math's exp."""
    return fast_math.exp_poly(s, m, s.dtype) if fast_math.active() else _probs_mlx(s, m)


@partial(mx.compile, shapeless=True)
def _probs_mlx(s, m):
    return mx.exp(s.astype(mx.float32) - m).astype(s.dtype)


@partial(mx.compile, shapeless=True)
def _fold(m, m_new, l, p_sum, acc, pv):
    """The running sum and output rescaled to the new running max, plus this tile's part (one pass)."""
    alpha = mx.exp(m - m_new)
    return l * alpha + p_sum, acc * alpha + pv


def _group(spans, tile_keys):
    """Consecutive spans grouped into tiles of at most tile_keys keys."""
    tile, n = [], 0
    for start, span in spans:
        rows = span[0].shape[1]
        if tile and n + rows > tile_keys:
            yield tile
            tile, n = [], 0
        tile.append((start, span))
        n += rows
    if tile:
        yield tile
