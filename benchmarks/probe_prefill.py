"""Where prefill and decode time goes at the full shape, per component (GPU profile probe).

  python benchmarks/probe_prefill.py [--parts moe,kda,tile,mla,decode,ops]

MoE: one layer, 2,048 tokens, each expert path (KIMI_MLX_EXPERTS). KDA: one layer's attention.
MLA prefill: one 2,048-token step at a given context, per score-tile size (KIMI_MLX_MLA_TILE_MB).
MLA decode: one layer's token step at a given context, the eager tiled path against the whole-page
compiled step (what the decoder uses). Ops: the primitives one decode step of the whole model runs (from
its graph), and MLX's cost per primitive on this device (a chain of tiny adds).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, ".")
import mlx.core as mx  # noqa: E402

from kimi_mlx import bench  # noqa: E402
from kimi_mlx.model.fuse import ExpertBlocks  # noqa: E402
from kimi_mlx.ops import attention as A  # noqa: E402
from kimi_mlx.ops import mla_decode as MD  # noqa: E402
from kimi_mlx.state import KDAState, MLAState  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--parts", default="moe,kda,mla,decode")
ap.add_argument("--shape", default="full")
ap.add_argument("--tokens", type=int, default=2048)
ap.add_argument("--mla-contexts", default="4096,131072")
ap.add_argument("--tiles-mb", default="64,256,1024")
ap.add_argument("--decode-contexts", default="1024,32768,131072,1048576")
ap.add_argument("--scan-rows", default="1,2,4,8", help="KDA scan kernel: state rows per 32-lane group, each timed")
ap.add_argument("--reps", type=int, default=0, help="timed calls of every item after an untimed one (0: each "
                "item's own count, 2 to 10)")
a = ap.parse_args()
parts = a.parts.split(",")

ours, _, cfg = bench.build(a.shape, peer=False, dtype=bench.activation_dtype())
L = ours.model.layers
T = a.tokens
D, W = cfg["hidden_size"], cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
DT = ours.dtype
h = mx.random.normal((1, T, D)).astype(DT)


def timeit(name, fn, n=3):
    n = a.reps or n
    mx.eval(fn())
    mx.synchronize()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    t0 = time.perf_counter()
    for _ in range(n):
        mx.eval(fn())
    mx.synchronize()
    dt = (time.perf_counter() - t0) / n
    print(f"{name:58s} {dt * 1e3:9.3f} ms   peak +{(mx.get_peak_memory() - base) / 1e9:.2f} GB", flush=True)
    return dt


kda_i = [i for i in range(len(L)) if L[i].is_kda][1]
mla_i = [i for i in range(len(L)) if not L[i].is_kda][0]

if "moe" in parts:
    for path in ("sorted", "segmented", "bounded"):
        os.environ["KIMI_MLX_EXPERTS"] = path
        timeit(f"MoE, 1 layer, {T} tokens, experts {path}", lambda: L[kda_i].mlp(h))
    ffn = mx.compile(L[kda_i].ffn)
    timeit(f"MoE FFN half, 1 layer, {T} tokens, experts bounded, compiled", lambda: ffn(h))
    os.environ["KIMI_MLX_EXPERTS"] = "bounded"
    for blk in (32, 128):
        ExpertBlocks.BLOCK = blk
        timeit(f"MoE, 1 layer, {T} tokens, experts bounded {blk}", lambda: L[kda_i].mlp(h))
    ExpertBlocks.BLOCK = 64
    os.environ.pop("KIMI_MLX_EXPERTS")
    # the banks dequantized (what a dense grouped matmul would need) and MLX's gather_mm over expert-sorted
    # single rows (on CUDA a grouped GEMM): is dequantize + grouped GEMM worth building?
    moe = L[kda_i].mlp
    gu, dn = moe.gate_up_proj, moe.down_proj
    if hasattr(gu, "scales"):
        def deq(b):
            return mx.dequantize(b.weight, b.scales, b.get("biases"), group_size=b.group_size, bits=b.bits)
        timeit("MoE banks dequantized (gate_up + down)", lambda: [deq(gu), deq(dn)])
        W1, W2 = deq(gu), deq(dn)
        x2 = h.reshape(-1, D)
        idx, _ = moe.gate(x2, shared=moe.num_shared)
        order = mx.argsort(idx.flatten())
        k = idx.shape[1]
        xs, ids = x2[order // k][:, None], idx.flatten()[order].astype(mx.uint32)
        mx.eval(W1, W2, xs, ids)
        timeit("  gather_mm sorted rows, dense gate_up bank", lambda: mx.gather_mm(xs, W1.swapaxes(-1, -2), rhs_indices=ids, sorted_indices=True))
        hmid = mx.random.normal((xs.shape[0], 1, W2.shape[-1])).astype(DT)
        timeit("  gather_mm sorted rows, dense down bank", lambda: mx.gather_mm(hmid, W2.swapaxes(-1, -2), rhs_indices=ids, sorted_indices=True))
        blocks = ExpertBlocks(idx, moe.num_routed + moe.num_shared)
        xb = blocks.rows(x2)
        mx.eval(xb)
        timeit("  gather_mm 64-row expert blocks, dense gate_up bank",
               lambda: mx.gather_mm(xb, W1.swapaxes(-1, -2), rhs_indices=blocks.expert))
        timeit("  gather_qmm 64-row expert blocks, quantized gate_up bank (the bounded path's)",
               lambda: gu(xb, blocks.expert))
        del W1, W2
    timeit("dense MLP, layer 0", lambda: L[0].mlp(h))

if "kda" in parts:
    from kimi_mlx.model.kda import short_conv
    from kimi_mlx.ops import kda_chunked as KC
    from kimi_mlx.ops.kda import l2_normalize

    SCAN_ROWS = KC.SCAN_ROWS

    st = ours.new_state()
    ks = st.layers[kda_i]
    layer = L[kda_i]
    attn = layer.self_attn
    timeit(f"KDA attention, 1 layer, {T} tokens", lambda: attn(h, KDAState(ks.conv, ks.recurrent)))
    step = layer.compiled_kda_attention()
    timeit(f"KDA attention, 1 layer, {T} tokens, compiled", lambda: step(h, ks.conv, ks.recurrent))
    # the pieces, eager, one at a time
    H, Dh = attn.num_heads, attn.head_dim
    timeit("  qkv projection", lambda: attn.qkv_proj(h))
    qkv_raw = attn.qkv_proj(h)
    timeit("  short conv + SiLU", lambda: short_conv(qkv_raw, ks.conv, attn.conv_weight)[0])
    f_a, g_a, b_logit = attn.low_rank_inputs(h)
    timeit("  low-rank gate inputs (one matmul)", lambda: attn.low_rank_inputs(h)[0])
    timeit("  forget gate (f_b, softplus)", lambda: attn.gate(f_a))
    qkv = short_conv(qkv_raw, ks.conv, attn.conv_weight)[0].reshape(1, T, 3, H, Dh)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    g, beta = attn.gate(f_a), mx.sigmoid(b_logit.astype(mx.float32))
    qn, kn = l2_normalize(q) * Dh**-0.5, l2_normalize(k)
    mx.eval(qn, kn, v, g, beta)
    gpu = mx.default_device() == mx.gpu
    for rows in map(int, a.scan_rows.split(",")) if gpu else (0,):
        KC.SCAN_ROWS = rows
        timeit(f"  chunked KDA op (scan {f'kernel, {rows} rows a group' if gpu else 'ops'})",
               lambda: KC.kda_chunked(qn, kn, v, g, beta, ks.recurrent, use_kernel=gpu))
    KC.SCAN_ROWS = SCAN_ROWS
    timeit("  chunked KDA op (scan affine: one addmm a chunk in order)",
           lambda: KC.kda_chunked(qn, kn, v, g, beta, ks.recurrent, use_kernel=gpu, scan="affine"))
    n = -(-T // KC.CHUNK)
    cq, ck, cg = (KC._to_chunks(x, n) for x in (qn, kn, g))
    cb = KC._to_chunks(beta, n)
    alpha = mx.exp(cg)
    mx.eval(cq, ck, alpha, cb)
    timeit("    of which intra-chunk matrices (ops)", lambda: KC.intra_chunk(cq, ck, alpha, cb))
    if gpu:
        timeit("    of which intra-chunk matrices (kernel)", lambda: KC.intra_chunk_kernel(cq, ck, cg, cb))
        cv = KC._to_chunks(v, n)
        s0 = mx.zeros_like(ks.recurrent)
        mx.eval(cv, s0)
        timeit("    of which the scan kernel", lambda: KC.scan_kernel(0.1 * ck, cv, cq, ck, alpha[..., -1, :], s0))
        timeit("    the scan as ops (a few matmuls a chunk)", lambda: KC.scan_ops(0.1 * ck, cv, cq, ck, alpha[..., -1, :], s0))
        timeit("    the scan affine (one addmm a chunk)", lambda: KC.scan_affine(0.1 * ck, cv, cq, ck, alpha[..., -1, :], s0))
    o = mx.random.normal((1, T, H, Dh))
    timeit("  output gate, norm, o_proj", lambda: attn.o_proj((mx.fast.rms_norm(o, attn.o_norm_weight, 1e-5)
                                                              * mx.sigmoid(attn.g_b_proj(g_a).reshape(1, T, H, Dh)))
                                                             .reshape(1, T, -1).astype(h.dtype)))


def filled(S):
    s = MLAState()
    for a0 in range(0, S, 65536):
        s.append(mx.random.normal((1, min(65536, S - a0), W)).astype(DT))
        mx.eval([p[0] for p in s.pages])
    return s


if "tile" in parts:
    # one score tile of the expanded MLA prefill (ops/attention.py _Expanded), piece by piece, of --tiles-mb's
    # first size (64 MB by default: TILE_BYTES)
    attn = L[mla_i].self_attn
    H, nope, Lr = attn.num_heads, attn.nope, attn.latent_rank
    tile_bytes, A.TILE_BYTES = A.TILE_BYTES, int(a.tiles_mb.split(",")[0]) << 20
    keys = A.choose_tiling(1, H, T, 1 << 30).tile_keys
    A.TILE_BYTES = tile_bytes
    k_up, v_up = attn.k_up.astype(DT), attn.v_up.astype(DT)
    rows = mx.random.normal((1, keys, W)).astype(DT)
    q = mx.random.normal((1, H, T, nope + attn.pe)).astype(DT)
    lat = rows[:, None, :, :Lr]
    k = lat @ k_up.swapaxes(-1, -2)
    vv = lat @ v_up.swapaxes(-1, -2)
    q_pe = q[..., nope:].reshape(1, H * T, -1)
    s_pe = (q_pe @ rows[..., Lr:].swapaxes(-1, -2)).reshape(1, H, T, -1)
    sc = mx.addmm(s_pe, q[..., :nope], k.swapaxes(-1, -2))
    m = sc.max(-1, keepdims=True).astype(mx.float32)
    p = A._probs(sc, m)
    mx.eval(k, vv, s_pe, sc, m, p)
    flops = 2 * H * T * keys * (nope + attn.pe + attn.v_dim)
    print(f"tile: {T} queries x {keys} keys x {H} heads, {flops / 1e9:.1f} GFLOP in its matmuls")
    timeit("  expand K (latent @ k_up^T)", lambda: lat @ k_up.swapaxes(-1, -2), n=10)
    timeit("  expand V (latent @ v_up^T)", lambda: lat @ v_up.swapaxes(-1, -2), n=10)
    timeit("  pe scores (heads folded into rows)", lambda: q_pe @ rows[..., Lr:].swapaxes(-1, -2), n=10)
    timeit("  nope scores, addmm onto pe", lambda: mx.addmm(s_pe, q[..., :nope], k.swapaxes(-1, -2)), n=10)
    timeit("  nope scores alone (matmul)", lambda: q[..., :nope] @ k.swapaxes(-1, -2), n=10)
    timeit("  192-dim scores, one matmul (K concatenated)", lambda: q @ mx.concatenate(
        [k, mx.broadcast_to(rows[:, None, :, Lr:], (1, H, keys, attn.pe))], axis=-1).swapaxes(-1, -2), n=10)
    form = A._Expanded(q, None, k_up, v_up, 1.0)
    timeit("  expand K with k_aug (as _Expanded)", lambda: rows[:, None] @ form.k_aug_t, n=10)
    kk = rows[:, None] @ form.k_aug_t
    timeit("  192-dim scores against it", lambda: q @ kk.swapaxes(-1, -2), n=10)
    timeit("  row max", lambda: sc.max(-1, keepdims=True), n=10)
    timeit("  probabilities (exp, compiled)", lambda: A._probs(sc, m), n=10)
    timeit("  values + row sums (one ones column, N = v + 1)",
           lambda: p @ mx.concatenate([vv, mx.ones((*vv.shape[:-1], 1), vv.dtype)], axis=-1), n=10)
    timeit(f"  values + row sums ({A.ONES} ones columns, as _Expanded)", lambda: p @ A._ones_column(vv), n=10)
    timeit("  values alone (N = v)", lambda: p @ vv, n=10)
    timeit("  row sums alone", lambda: p.astype(mx.float32).sum(-1), n=10)
    acc = mx.zeros((1, H, T, attn.v_dim), mx.float32)
    timeit("  rescale accumulator (compiled fold)", lambda: A._fold(m, m, m, m, acc, acc), n=10)

if "mla" in parts:
    attn = L[mla_i].self_attn
    tile_bytes, chunks = A.TILE_BYTES, A.CAUSAL_CHUNKS
    for S in map(int, a.mla_contexts.split(",")):
        base = filled(S - T)

        def step():
            s = MLAState(base.pages, base.length)
            return attn(h, s)

        for mb in map(int, a.tiles_mb.split(",")):
            A.TILE_BYTES = mb << 20
            timeit(f"MLA prefill step, 1 layer, context {S}, tile {mb} MB", step, n=2)
        A.TILE_BYTES = tile_bytes
        if 2 * T >= S:  # a prompt's first steps: the causal query chunks (fewer, larger: fewer launches)
            for c in (1, 2, 4):
                A.CAUSAL_CHUNKS = c
                timeit(f"MLA prefill step, 1 layer, context {S}, {c} causal query chunks (default {chunks})", step, n=2)
            A.CAUSAL_CHUNKS = chunks
        del base
        mx.clear_cache()

if "decode" in parts:
    layer = L[mla_i]
    x = mx.random.normal((1, 1, D)).astype(DT)
    compiled = layer.compiled_step()
    for S in map(int, a.decode_contexts.split(",")):
        base = filled(S)

        def eager():
            s = MLAState(base.pages, base.length)
            return layer(x, s)

        def whole_pages():
            s = MLAState(base.pages, base.length)
            h, r, last = compiled(x, None, s.decode_slot())
            return h, r, last

        timeit(f"MLA layer decode, context {S}, eager tiled", eager, n=10)
        timeit(f"MLA layer decode, context {S}, compiled whole pages", whole_pages, n=10)
        for c in (0, 2048):
            MD.SPLIT_ROWS = c
            compiled = layer.compiled_step()
            timeit(f"MLA layer decode, context {S}, compiled, split {c}", whole_pages, n=10)
        MD.SPLIT_ROWS = 512
        compiled = layer.compiled_step()
        del base
        mx.clear_cache()

if "ops" in parts:
    import collections
    import io
    import re

    from kimi_mlx.config import ModelConfig

    r = bench.Runner("kimi-mlx", ours, True)
    r.fill_context(1024, ModelConfig.from_dict(cfg))
    tok = mx.array([[1]])
    for _ in range(3):  # warm: traces the compiled steps
        mx.eval(ours(tok, r.state))
        r.eval_state()
    out = ours(tok, r.state)
    f = io.StringIO()
    mx.export_to_dot(f, out, *r.state.arrays().values())
    labels = re.findall(r'label ="([^"]+)", shape=rectangle', f.getvalue())
    counts = collections.Counter(labels)
    print(f"decode step at 1024: {len(labels)} primitives in its graph; most common: "
          + ", ".join(f"{k} {v}" for k, v in counts.most_common(12)), flush=True)
    mx.eval(out)
    r.eval_state()
    timeit("decode step at 1024, whole model", lambda: (ours(tok, r.state), *r.state.arrays().values()), n=20)
    build = run = 0.0
    for _ in range(20):  # the same step split: building its graph in Python, then evaluating it
        mx.synchronize()
        t0 = time.perf_counter()
        out = ours(tok, r.state)
        t1 = time.perf_counter()
        mx.eval(out, *r.state.arrays().values())
        mx.synchronize()
        build, run = build + t1 - t0, run + time.perf_counter() - t1
    print(f"  of which building the graph {build / 20 * 1e3:.3f} ms, evaluating it {run / 20 * 1e3:.3f} ms", flush=True)

    def chain(n=1000):
        x = mx.zeros((1,))
        for _ in range(n):
            x = x + 1.0
        return x

    t = timeit("chain of 1,000 tiny adds (eager, one eval)", chain, n=5)
    print(f"  -> {t * 1e3:.1f} us per primitive", flush=True)
