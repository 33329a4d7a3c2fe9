"""MLA decode: one new token's query over the latent cache's whole pages (mla_decode), and its fast paths.

  matmuls      _decode_pages: scores, a masked softmax and the values as matmuls over every page (the twin
               of the absorbed tiled attention for T = 1, ops/attention.py); shape-stable, so the decoder
               compiles it and keeps one graph while the cache grows inside its pages.
  page kernels decode_page_kernel (twin decode_page_ref): one page of up to PAGE_KERNEL_ROWS rows as two
               kernels (metal_kernels/mla_decode_page.body, chunks of rows for a group of heads, then
               mla_decode_merge.body combining the chunks per head).
  split        _decode_split for longer or several pages: per page the scores matmul, decode_chunks_kernel
               (each chunk's masked softmax weights), the chunks' values as one batched matmul, then
               decode_merge_kernel over every page's chunks (twins decode_chunks_ref, decode_merge_ref).
mla_decode takes the page kernels where page_kernel_fits, else the split kernels where split_kernels_fit,
else the matmuls; KIMI_MLX_MLA_PAGE=off (or KIMI_MLX_MLA=ref) keeps the matmuls everywhere, and a kernel
switched off at load (metal_kernels.usable) gives way the same way.
"""

from __future__ import annotations

import mlx.core as mx

from .. import settings
from ..state import LatentCache, positions
from . import fast_math
from .attention import _absorb

PAGE_ENV = "KIMI_MLX_MLA_PAGE"  # on (default) | off: decode kernels on a GPU (page_kernel_fits, split_kernels_fit)


SPLIT_ROWS = 512  # decode: a page's values matmul runs as a batch of SPLIT_ROWS-row pieces (split-K; 0: off) ...
SPLIT_MIN_ROWS = 4096  # ... from this many rows a page (below, the pieces' transpose, cast and sum cost more
#                        launches than the matmul they spread, and one page holds a short context)


def mla_decode(q, cache: LatentCache, row: mx.array, k_up, v_up, scale: float, absorb=None,
               values=None) -> mx.array:
    """One query per sequence over whole cache pages: every row of the pages but the last (which must be
    wholly valid), and the last page's rows up to `row` (int32, one element, or one per sequence [B, 1, 1]: the
    new token's row in the last page, for sequences at their own lengths).

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
    path = choose(*_call(qa, cache))
    if path == "page":
        o = decode_page_kernel(qa, cache.pages[0][0], row)
    elif path == "split":
        o = _decode_split(qa, cache, row)
    else:
        o = _decode_pages(qa, cache, row, q.dtype).astype(q.dtype)
    o = o[:, :, None]
    return o @ values.swapaxes(-1, -2) if values is not None else o[..., :L] @ v_up.swapaxes(-1, -2)


def _decode_pages(qa, cache: LatentCache, row: mx.array, dtype) -> mx.array:
    """mla_decode's attention over whole pages as matmuls, probabilities in dtype: qa [B, H, W] -> [B, H, W]
    (float32 when several pages are summed). row: the last page's last row each query sees, [B, 1, 1] (one for all
    sequences, or one a sequence of a ragged batch); given flat, one per query row H."""
    gs, bits = cache.group_size, cache.bits
    if bits:
        parts = [mx.quantized_matmul(qa, *p, transpose=True, group_size=gs, bits=bits) for p in cache.pages]
    else:
        parts = [qa @ p[0].swapaxes(-1, -2) for p in cache.pages]
    rows = row if row.ndim == 3 else row.reshape(1, -1, 1)  # [B, 1, 1]: a row per sequence (or one for all)
    parts[-1] = mx.where(positions(parts[-1].shape[-1]) <= rows, parts[-1], -mx.inf)
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


def _kernels_allowed(f: settings.Facts, quantized: bool, same_dtype: bool) -> bool:
    """What both decode kernel paths need: a GPU, KIMI_MLX_MLA_PAGE=on and KIMI_MLX_MLA not ref, an unquantized
    cache whose pages hold the query's dtype, the merge kernel not switched off."""
    return (not quantized and same_dtype and f[PAGE_ENV] == "on" and f["KIMI_MLX_MLA"] != "ref"
            and f.gpu is not None and f.usable("mla_decode_merge"))


def page_fits(f: settings.Facts, heads: int, width: int, page_rows: tuple, quantized: bool, same_dtype: bool) -> bool:
    """Whether the page kernels take the call: one page of at most PAGE_KERNEL_ROWS rows, whose head groups'
    queries and chunk scores fit in 24 KB of threadgroup memory (Metal allows 32)."""
    return (len(page_rows) == 1 and _kernels_allowed(f, quantized, same_dtype) and f.usable("mla_decode_page")
            and page_rows[0] <= PAGE_KERNEL_ROWS and heads % PAGE_KERNEL_HEADS == 0
            and (width + PAGE_CHUNK_ROWS) * PAGE_KERNEL_HEADS * 4 <= 24 * 1024)


def split_fits(f: settings.Facts, page_rows: tuple, quantized: bool, same_dtype: bool) -> bool:
    """Whether the split kernels take the call: pages each a whole number of chunks of min(SPLIT_ROWS, its rows).
    Four launches a page against the matmul path's eight, the scores read once by the chunk kernel (RESULTS.md
    times both from 16k to 131k rows)."""
    return (SPLIT_ROWS > 0 and _kernels_allowed(f, quantized, same_dtype) and f.usable("mla_decode_chunks")
            and all(n % min(SPLIT_ROWS, n) == 0 for n in page_rows))


def choose(f: settings.Facts, heads: int, width: int, page_rows: tuple, quantized: bool, same_dtype: bool) -> str:
    """'page', 'split' or 'matmuls' for one token's query of `heads` x `width` over pages of page_rows rows."""
    if page_fits(f, heads, width, page_rows, quantized, same_dtype):
        return "page"
    return "split" if split_fits(f, page_rows, quantized, same_dtype) else "matmuls"


def _call(qa, cache: LatentCache) -> tuple:
    """choose's arguments but the facts for a query qa [B, H, W] over `cache`."""
    from .kda import gpu_backend

    rows = tuple(p[0].shape[1] for p in cache.pages)
    same = all(p[0].dtype == qa.dtype for p in cache.pages)
    return settings.now(gpu_backend()), qa.shape[1], qa.shape[2], rows, bool(cache.bits), same


def page_kernel_fits(qa, cache: LatentCache) -> bool:
    f, H, W, rows, quantized, same = _call(qa, cache)
    return page_fits(f, H, W, rows, quantized, same)


def split_kernels_fit(qa, cache: LatentCache) -> bool:
    f, _, _, rows, quantized, same = _call(qa, cache)
    return split_fits(f, rows, quantized, same)


PROBE_BATCHES = (1, 8)  # one sequence, and a batch whose per-sequence `last` MLX passes in device memory: an input
#   of fewer than 8 elements goes to Metal's constant address space, so the two are two builds of each kernel


def probe_decode_kernels(cfg, dtype) -> None:
    """Run the MLA decode kernels the model's shapes take, once each at every PROBE_BATCHES size, on zeros: the page
    kernel over one page and the long-page kernels (mla_decode_chunks, mla_decode_merge) over two pages of SPLIT_ROWS
    rows, where page_kernel_fits and split_kernels_fit take them (Model.probe_kernels: its short probe never reaches a
    long page, and decodes one sequence only)."""
    W = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    for B in PROBE_BATCHES:
        qa = mx.zeros((B, cfg.num_attention_heads, W), dtype)
        last = mx.zeros((B,), mx.int32)
        page = (mx.zeros((B, SPLIT_ROWS, W), dtype),)
        if page_kernel_fits(qa, LatentCache((page,))):
            mx.eval(decode_page_kernel(qa, page[0], last))
        cache = LatentCache((page, page))
        if split_kernels_fit(qa, cache):
            mx.eval(_decode_split(qa, cache, last))


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
    return settings.value(PAGE_ENV)


def decode_page_ref(qa, page, last) -> mx.array:
    """softmax(qa . rows[:last + 1]) @ rows[:last + 1] per head, float32 inside, in qa's dtype: the twin of
    decode_page_kernel. qa [B, H, W] (absorbed, pre-scaled), page [B, N, W], last int32 (one element, or one per
    sequence) -> [B, H, W]."""
    f32 = mx.float32
    rows = page.astype(f32)
    s = qa.astype(f32) @ rows.swapaxes(-1, -2)  # [B, H, N]
    s = mx.where(mx.arange(page.shape[1]) <= last.reshape(-1, 1, 1), s, -mx.inf)
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
        inputs=[qa, page, per_row(last, B), dims(N, K)],
        template=[("H", H), ("W", W), ("HG", heads), ("NW", groups), ("R", chunk)],
        grid=(32 * groups, K * (H // heads), B), threadgroup=(32 * groups, 1, 1),
        output_shapes=[(B, K, H, W), (B, K, H), (B, K, H)], output_dtypes=[f32, f32, f32],
    )
    return decode_merge_kernel(part, most, total, qa.dtype)


def dims(*sizes: int) -> mx.array:
    """A kernel's run-time sizes (page rows, chunks): metal_kernels.sizes."""
    from metal_kernels import sizes as made

    return made(*sizes)


def per_row(last: mx.array, B: int) -> mx.array:
    """A kernel's `last` input: one int32 per sequence ([B]), from one element (every sequence alike) or one a
    sequence. No op where it is already that (a single sequence's view of the cached arange)."""
    last = last.reshape(-1).astype(mx.int32)
    return last if last.shape[0] == B else mx.broadcast_to(last, (B,))


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
        inputs=[part, most, total, dims(K)],
        template=[("H", H), ("W", W), ("NW", MERGE_GROUPS)],
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
    valid = mx.arange(N, dtype=mx.int32).reshape(1, K, 1, chunk) <= last.reshape(-1, 1, 1, 1)
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
        inputs=[s, per_row(last, B), dims(N, K)],
        template=[("H", H), ("C", chunk), ("NW", CHUNK_GROUPS)],
        grid=(T, K * H, B), threadgroup=(T, 1, 1),
        output_shapes=[(B, K, H, chunk), (B, K, H), (B, K, H)], output_dtypes=[s.dtype, f32, f32],
    )


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
