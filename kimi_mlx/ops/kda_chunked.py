"""Chunk-parallel KDA (UT/WY transform) in plain mx ops, chunk 64.

Same math as `kda_recurrent_ref` (kimi_linear.md §5). Only the gates g <= 0 are exponentiated, once
each: alpha = exp(g) in (0, 1]. Every decay between two rows is a product of alphas (cumprod), so
no factor exceeds 1 whatever the gate span inside a chunk (~6e4 in real checkpoints), and no decay
comes from a difference of large cumulative sums. Inside a chunk the pair decays are never formed
as a [C, C, Dk] tensor: the chunk is split in halves, recursively, and a pair (i in the upper half,
j in the lower half) is split at the border m:
  prod_{t=j+1..i} alpha_t = (prod_{t=m..i} alpha_t) * (prod_{t=j+1..m-1} alpha_t)
which turns each cross block into one matmul. The same recursion builds the
unit-lower-triangular inverse (I + A_kk)^-1 blockwise:
  [[L1, 0], [X, L2]]^-1 = [[L1^-1, 0], [-L2^-1 X L1^-1, L2^-1]]
so no triangular solve is needed.

On a GPU (use_kernel) two steps are kernels with the same contracts as their ops twins here:
`intra_chunk_kernel` (the per-chunk matrices, split at the same borders, inverse by forward
substitution; intra='mma' forms their products as 16x16 tiles on the matrix units) and `scan_kernel`
(the scan across chunks; `scan_ops` is its twin). The scan also has affine forms (S <- S A + B a chunk):
`scan_affine` (one addmm a chunk in order), `scan_doubling` (log2(N) levels of batched matmuls) and
`scan_mma` (the steps in order in one kernel, the state's products on the matrix units).
"""

from __future__ import annotations

import math

import mlx.core as mx

from . import fast_math

CHUNK = 64
SEGMENT = 8192  # tokens per pass: bounds the temporaries, the state carries over


def _to_chunks(x: mx.array, n: int) -> mx.array:
    """[B, T, H, ...] -> [N, B, H, C, ...] float32, zero-padded to N*C rows."""
    B, T = x.shape[:2]
    x = x.astype(mx.float32)
    if n * CHUNK > T:
        pad = [(0, 0)] * x.ndim
        pad[1] = (0, n * CHUNK - T)
        x = mx.pad(x, pad)
    x = x.reshape(B, n, CHUNK, *x.shape[2:])
    axes = (1, 0, 3, 2) + tuple(range(4, x.ndim))
    return x.transpose(axes)


def _join(lo: mx.array, cross: mx.array, hi: mx.array) -> mx.array:
    """Block lower-triangular [[lo, 0], [cross, hi]] over the last two axes."""
    top = mx.concatenate([lo, mx.zeros_like(lo)], axis=-1)
    bottom = mx.concatenate([cross, hi], axis=-1)
    return mx.concatenate([top, bottom], axis=-2)


def intra_chunk(q, k, alpha, beta):
    """Per-chunk matrices, on [..., C, D] inputs (alpha = exp(g) in (0, 1], beta [..., C]).

    Returns A_qk [..., C, C] (lower, with diagonal: q_i.k_j decayed from j to i) and
    Tinv [..., C, C] = (I + A_kk)^-1 with A_kk[i, j] = beta_i k_i.k_j decayed, i > j.
    """
    lead = q.shape[:-2]
    C = q.shape[-2]
    a_qk = (q * k).sum(-1)[..., None, None]  # C diagonal blocks of 1x1
    t_inv = mx.ones_like(a_qk)
    b = 1
    while b < C:
        nb = C // (2 * b)

        def halves(x):
            x = x.reshape(*lead, nb, 2, b, *x.shape[len(lead) + 1 :])
            at = (slice(None),) * (len(lead) + 1)
            return x[at + (0,)], x[at + (1,)]

        a_lo, a_hi = halves(alpha)
        k_lo, k_hi = halves(k)
        q_hi = halves(q)[1]
        beta_hi = halves(beta)[1][..., None]
        if b == 1:  # pairs (m, m-1): the decay is alpha_m alone
            kc = k_lo * a_hi
            x_qk = (q_hi * kc).sum(-1, keepdims=True)
            x_kk = (k_hi * kc).sum(-1, keepdims=True) * beta_hi
        else:
            row = mx.cumprod(a_hi, axis=-2)  # decay from the border m through row i
            col = mx.cumprod(a_lo, axis=-2, reverse=True, inclusive=False)  # from j+1 to m-1
            kc = (k_lo * col).swapaxes(-1, -2)
            x_qk = (q_hi * row) @ kc
            x_kk = ((k_hi * row) @ kc) * beta_hi
        blocks = a_qk.reshape(*lead, nb, 2, b, b)
        a_qk = _join(blocks[..., 0, :, :], x_qk, blocks[..., 1, :, :])
        blocks = t_inv.reshape(*lead, nb, 2, b, b)
        inv_lo, inv_hi = blocks[..., 0, :, :], blocks[..., 1, :, :]
        cross = -x_kk if b == 1 else -(inv_hi @ x_kk @ inv_lo)
        t_inv = _join(inv_lo, cross, inv_hi)
        b *= 2
    return a_qk.reshape(*lead, C, C), t_inv.reshape(*lead, C, C)


def scan_ops(w, u, q_in, k_out, decay_all, state):
    """The sequential scan across chunks, one chunk per step (N small ops each).

    w, q_in, k_out: [N, B, H, C, Dk]; u: [N, B, H, C, Dv]; decay_all: [N, B, H, Dk];
    state: [B, H, Dv, Dk].  Returns (v_new, q_state [N, B, H, C, Dv], state) with, per chunk,
    v_new = u - w S^T (the pseudo-values), q_state = q_in S^T, S <- S * decay_all + v_new^T k_out.
    """
    v_new, q_state = [], []
    state = state[None]  # chunk i is the slice [i:i+1] (a view; an integer index would be a gather)
    for i in range(w.shape[0]):
        at = slice(i, i + 1)
        s_t = state.swapaxes(-1, -2)  # [1, B, H, Dk, Dv]
        vi = mx.addmm(u[at], w[at], s_t, alpha=-1.0)
        q_state.append(q_in[at] @ s_t)
        state = mx.addmm(state * decay_all[at][..., None, :], vi.swapaxes(-1, -2), k_out[at])
        v_new.append(vi)
    return mx.concatenate(v_new), mx.concatenate(q_state), state.squeeze(0)


def scan_affine(w, u, q_in, k_out, decay_all, state):
    """`scan_ops` with one matmul a chunk on the critical path: with v_new = u - w S^T the update is affine,
    S <- S A + B with A = Diag(decay_all) - w^T k_out [Dk, Dk] and B = u^T k_out [Dv, Dk], so every chunk's
    A and B, and afterwards every chunk's v_new and q_state from the state it starts with, are batched
    matmuls over all chunks at once; only the N steps S <- S A + B (one addmm each) run in order."""
    eye = mx.eye(w.shape[-1], dtype=w.dtype)
    a = eye * decay_all[..., None, :] - w.swapaxes(-1, -2) @ k_out  # [N, B, H, Dk, Dk]
    b = u.swapaxes(-1, -2) @ k_out  # [N, B, H, Dv, Dk]
    starts = []
    state = state[None]  # chunk i is the slice [i:i+1] (a view; an integer index would be a gather)
    for i in range(w.shape[0]):
        starts.append(state)
        state = mx.addmm(b[i : i + 1], state, a[i : i + 1])
    s_t = mx.concatenate(starts).swapaxes(-1, -2)  # [N, B, H, Dk, Dv]: each chunk's starting state, transposed
    return u - w @ s_t, q_in @ s_t, state.squeeze(0)


def _starts(a, b, s0):
    """The state each step starts from for x_0 = s0, x_{i+1} = x_i a_i + b_i (i < N), by recursive doubling: each
    pair of steps is one affine map (x a_e a_o + b_e a_o + b_o), the recursion gives every pair's starting state,
    and the odd steps' starting states follow with one batched addmm. log2(N) levels of a few batched matmuls
    each, where the sequential form runs N matmuls in order. a [N, ..., Dk, Dk], b [N, ..., Dv, Dk], s0 [..., Dv, Dk];
    returns [N, ..., Dv, Dk]. The maps are contractions (products of decays <= 1 and I - beta k k^T with
    |k| = 1, beta in (0, 1)), so their products stay bounded whatever the gates."""
    n = a.shape[0]
    if n == 1:
        return s0[None]
    if n % 2:  # one identity step at the end; its starting state is dropped
        a = mx.concatenate([a, mx.broadcast_to(mx.eye(a.shape[-1], dtype=a.dtype), (1, *a.shape[1:]))])
        b = mx.concatenate([b, mx.zeros((1, *b.shape[1:]), b.dtype)])
    pairs = a.shape[0] // 2
    a = a.reshape(pairs, 2, *a.shape[1:])
    b = b.reshape(pairs, 2, *b.shape[1:])
    a_e, a_o, b_e, b_o = a[:, 0], a[:, 1], b[:, 0], b[:, 1]
    even = _starts(a_e @ a_o, mx.addmm(b_o, b_e, a_o), s0)  # the state before steps 0, 2, 4, ...
    odd = mx.addmm(b_e, even, a_e)  # before steps 1, 3, 5, ...
    return mx.stack([even, odd], axis=1).reshape(2 * pairs, *even.shape[1:])[:n]


def scan_doubling(w, u, q_in, k_out, decay_all, state):
    """`scan_affine` with the chain S <- S A + B in log2(N) levels of batched matmuls (`_starts`) instead of N
    addmms in order: ~3N state-sized matmuls of work where the chain has N, but every one of them in a batch over
    all chunks and heads, on the matrix units (cuBLAS / MLX's GEMMs), and ~6 log2(N) launches in all."""
    eye = mx.eye(w.shape[-1], dtype=w.dtype)
    a = eye * decay_all[..., None, :] - w.swapaxes(-1, -2) @ k_out  # [N, B, H, Dk, Dk]
    b = u.swapaxes(-1, -2) @ k_out  # [N, B, H, Dv, Dk]
    starts = _starts(a, b, state)
    s_t = starts.swapaxes(-1, -2)
    final = mx.addmm(b[-1], starts[-1], a[-1])
    return u - w @ s_t, q_in @ s_t, final


def scan_mma(w, u, q_in, k_out, decay_all, state):
    """`scan_affine` with its N steps S <- S A + B in order as one kernel (metal_kernels/kda_scan_mma.body), the
    state's products on the matrix units and the state in threadgroup memory between chunks; A, B and the outputs
    are batched matmuls as in scan_affine. The kernel takes Dk and Dv multiples of 16; other shapes run
    scan_affine."""
    from metal_kernels import kernel

    N, B, H, C, Dk = w.shape
    Dv = u.shape[-1]
    if Dk % 16 or Dv % 16:
        return scan_affine(w, u, q_in, k_out, decay_all, state)
    eye = mx.eye(Dk, dtype=w.dtype)
    a_t = eye * decay_all[..., :, None] - k_out.swapaxes(-1, -2) @ w  # A^T [N, B, H, Dk, Dk]
    b = u.swapaxes(-1, -2) @ k_out  # [N, B, H, Dv, Dk]
    starts, final = kernel("kda_scan_mma")(
        inputs=[a_t, b, state.astype(mx.float32), mx.array([N, B * H], dtype=mx.int32)],
        template=[("DK", Dk), ("DV", Dv)],
        grid=(128, Dv // 16, B * H),
        threadgroup=(128, 1, 1),
        output_shapes=[b.shape, state.shape],
        output_dtypes=[mx.float32] * 2,
    )
    s_t = starts.swapaxes(-1, -2)
    return u - w @ s_t, q_in @ s_t, final


SCAN_ROWS = 4  # state rows per 32-lane group in the scan kernel: each chunk row read serves this many


def scan_kernel(w, u, q_in, k_out, decay_all, state):
    """`scan_ops` as one Metal/CUDA kernel (metal_kernels/kda_chunk_scan.body); needs Dk % 32 == 0. A 32-lane
    group per SCAN_ROWS state rows, each chunk row a lane reads serving all of them (RESULTS.md times it and a
    block-tiled variant that gained nothing)."""
    from metal_kernels import group_rows, kernel

    N, B, H, C, Dk = w.shape
    Dv = u.shape[-1]
    per_group = next(r for r in range(SCAN_ROWS, 0, -1) if Dv % r == 0)
    groups = Dv // per_group
    return kernel("kda_chunk_scan")(
        inputs=[w, u, q_in, k_out, decay_all, state, mx.array([N, B], dtype=mx.int32)],
        template=[("NH", H), ("DK", Dk), ("DV", Dv), ("C", C), ("R", per_group)],
        grid=(32, groups, B * H),
        threadgroup=(32, group_rows(groups, 4), 1),
        output_shapes=[u.shape, u.shape, state.shape],
        output_dtypes=[mx.float32] * 3,
    )


INTRAS = ("kernel", "mma")  # intra_chunk_kernel's kernels: kda_intra_chunk, kda_intra_chunk_mma


def intra_chunk_kernel(q, k, g, beta, intra="kernel"):
    """`intra_chunk` as one Metal/CUDA kernel, from the log-decay g: intra 'kernel' (kda_intra_chunk.body: the
    pair products on the CUDA / SIMD cores) or 'mma' (kda_intra_chunk_mma.body: the same products as 16x16 tiles
    on the matrix units, tensor cores / simdgroup matrices; C 16, 32 or 64, Dk a multiple of 8).

    q, k, g: [..., C, Dk] float32; beta [..., C]. Returns (A_qk, Tinv) [..., C, C]."""
    from metal_kernels import kernel

    *lead, C, Dk = q.shape
    a_qk, t_inv = kernel("kda_intra_chunk_mma" if intra == "mma" else "kda_intra_chunk")(
        inputs=[q, k, g, beta],
        template=[("DK", Dk), ("C", C)],
        grid=(256, math.prod(lead), 1),
        threadgroup=(256, 1, 1),
        output_shapes=[(*lead, C, C)] * 2,
        output_dtypes=[mx.float32] * 2,
    )
    return a_qk, t_inv


SCANS = ("ops", "affine", "doubling", "kernel", "mma")  # scan_ops, _affine, _doubling, _kernel, _mma


def _segment(q, k, v, g, beta, state, use_kernel, scan, intra):
    """One pass over T <= SEGMENT tokens; shapes as in `kda_chunked`."""
    B, T, H, _ = q.shape
    n = -(-T // CHUNK)
    q, k, v, g = (_to_chunks(x, n) for x in (q, k, v, g))  # [N, B, H, C, D]
    beta = _to_chunks(beta, n)  # [N, B, H, C]
    alpha = fast_math.exp(g)  # on the CPU the polynomial (MLX's exp runs an element at a time there)
    a_qk, t_inv = intra_chunk_kernel(q, k, g, beta, intra) if use_kernel else intra_chunk(q, k, alpha, beta)
    scan = {"ops": scan_ops, "affine": scan_affine, "doubling": scan_doubling, "kernel": scan_kernel,
            "mma": scan_mma}[scan]
    m = t_inv * beta[..., None, :]  # T Diag(beta)
    decay_in = mx.cumprod(alpha, axis=-2)  # chunk start -> row i (inclusive)
    decay_out = mx.cumprod(alpha, axis=-2, reverse=True, inclusive=False)  # row i -> chunk end
    w = m @ (k * decay_in)
    u = m @ v
    v_new, q_state, state = scan(w, u, q * decay_in, k * decay_out, decay_in[..., -1, :], state)
    o = q_state + a_qk @ v_new  # [N, B, H, C, Dv]
    o = o.transpose(1, 0, 3, 2, 4).reshape(B, n * CHUNK, H, -1)[:, :T]
    return o, state


def kda_chunked(q, k, v, g, beta, state, use_kernel=False, scan=None, intra="kernel"):
    """Chunked KDA on normalised inputs; same contract as `kda_recurrent_ref`.

    q, k: [B, T, H, Dk] (q already scaled); v: [B, T, H, Dv]; g: [B, T, H, Dk] log-decay <= 0;
    beta: [B, T, H]; state: [B, H, Dv, Dk] f32.  Returns (o [B, T, H, Dv] f32, state).
    use_kernel: the per-chunk matrices (and by default the scan across chunks) as GPU kernels instead of ops.
    scan: one of SCANS for the scan across chunks ('kernel' with use_kernel, else 'ops', by default).
    intra: with use_kernel, which kernel forms the per-chunk matrices (INTRAS).
    """
    scan = scan or ("kernel" if use_kernel else "ops")
    state = state.astype(mx.float32)
    outs = []
    for s in range(0, q.shape[1], SEGMENT):
        part = slice(s, s + SEGMENT)
        o, state = _segment(q[:, part], k[:, part], v[:, part], g[:, part], beta[:, part], state, use_kernel, scan,
                            intra)
        outs.append(o)
    return (outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)), state
