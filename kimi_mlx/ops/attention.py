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
One new token over the cache (decode) is ops/mla_decode.py's.
Quantized caches (see LatentCache.bits) always take the tiled path.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import mlx.core as mx

from .. import settings
from ..state import LatentCache
from ..working_set import await_frees
from . import fast_math

ENV = "KIMI_MLX_MLA"
MODES = ("auto", "ref", "fused", "tiled")
TILE_ENV = "KIMI_MLX_MLA_TILE_MB"


def tile_bytes_from_env() -> int:
    """KIMI_MLX_MLA_TILE_MB. Default 64 (256 keys x 2,048 queries x 32 heads at the real shape) on CPU,
    256 on a GPU, where fewer, larger tiles launch less per key and 256 keeps a step's working set near 1 GB
    (RESULTS.md times 64 to 1,024)."""
    return int(settings.value(TILE_ENV)) << 20


TILE_BYTES = tile_bytes_from_env()  # one float32 score tile
# memory a tiled call may hold above its start before it waits for MLX's frees (GPU only: MLX frees there on a
# worker thread, late). Two tiles in flight legitimately hold ~2.6 TILE_BYTES (bf16 scores and probabilities,
# values, expanded K and V), so the slack must stay above that
FREE_SLACK = 4 * TILE_BYTES if mx.default_device() == mx.gpu else None
MIN_TILE_KEYS = 256  # below this many keys per tile, chunk the queries instead


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
    return settings.value(ENV)


def choose(f: settings.Facts, score_bytes: int, absorbed: bool, pages: int, quantized: bool) -> str:
    """'ref', 'fused' or 'tiled' for a call whose whole [B, H, T, S] float32 score array is score_bytes: KIMI_MLX_MLA
    if set, else fused where one tile holds it, the form is expanded and the cache one dense page, else tiled."""
    path = f[ENV]
    if path != "auto":
        return path
    fits = score_bytes <= TILE_BYTES
    return "fused" if fits and not absorbed and pages == 1 and not quantized else "tiled"


def mla_attention(q, cache: LatentCache, k_up, v_up, scale: float, *, path: str | None = None,
                  absorbed: bool | None = None, tiling: Tiling | None = None) -> mx.array:
    """Causal MLA attention of T new queries over the whole cache (which already holds them).

    q: [B, H, T, nope + pe]; k_up: [H, nope, L]; v_up: [H, v, L].  Returns [B, H, T, v] in q's dtype.
    path: 'ref' | 'fused' | 'tiled' | 'auto' (choose's rule) | None (KIMI_MLX_MLA, then choose's rule).
    """
    B, H, T, _ = q.shape
    S = cache.length
    _, nope, L = k_up.shape
    pe = q.shape[-1] - nope
    if absorbed is None:
        absorbed = absorbed_is_cheaper(T, L, pe, nope, v_up.shape[1])
    if path is None or path == "auto":  # choose's rule; None: KIMI_MLX_MLA first (the device plays no part)
        f = settings.now(None) if path is None else settings.Facts({ENV: "auto"})
        path = choose(f, B * H * T * S * 4, absorbed, len(cache.pages), bool(cache.bits))
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


def choose_cache_rows(f: settings.Facts, L: int) -> str:
    """'kernel' on a GPU (unless KIMI_MLX_MLA=ref) for a latent rank L the kernel splits, else 'ref'."""
    return "kernel" if f[ENV] != "ref" and f.gpu and L % 32 == 0 and f.usable("mla_cache_row") else "ref"


def cache_rows(ckv, weight, eps: float, L: int) -> mx.array:
    """The latent cache's rows from the kv_a projection (choose_cache_rows' path)."""
    from .kda import gpu_backend

    if choose_cache_rows(settings.now(gpu_backend()), L) == "kernel":
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
