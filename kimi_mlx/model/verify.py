"""A forward over a few new tokens (speculative verification) computed row for row as decode computes it.

Plain decoding feeds one token a step through each layer's one-token step (DecoderLayer.kda_step /
mla_step). A verification forward feeds T = 2..16 tokens at once and must give every row the logits and the
state that T one-token steps would give, so a speculative run's tokens are plain decoding's tokens. The
prefill path (model.hidden with T > 1) does not: its chunked KDA and tiled attention sum in another order,
and at small T it costs several decode steps. Here each layer runs decode's own pieces over T rows:

  row-wise work  embedding, norms and residual adds, every projection (q|k|v, gates, q|kv, o_proj), the
                 FFN (a fused MoE on its one-token expert path: the decode kernel or the gather matmuls)
                 and the lm_head run once over the T rows as a small batch: each output row is a function
                 of its input row alone (reads each weight once for T rows, which is where a GPU's time goes)
  KDA            on the ops path (CPU) the conv, norms and gates of all T rows at once, the state update token
                 by token, the output gate over all rows (ops/kda_decode.decode_rows_ops); on the kernel path
                 the fused decode kernel once a token, or from ROWS_FROM tokens one kda_decode_rows launch
                 for all of them; each token's conv tail and recurrent state kept
  MLA            all T queries in one attention over the cache with the T rows written (the decode matmul
                 path, query t masked past row t) where the rows land in one page, else decode's attention
                 (KimiMLA.decode_row over MLAState.decode_slot) once a row
Each KDA layer, and each MLA layer whose rows land in one page, runs as one compiled step, traced once per
width T (and again when a page grows), as decode's one-token steps are.

What makes rows equal to decode's is row-invariance of the batched matmuls: on the CPU, MLX's float32 and
quantized matmuls give each row the bits they give it alone (tests/test_speculative.py checks the logits
bit for bit against decode). A GPU's matmul kernels for a few rows and for one may round differently, so
there a verification's logits are decode's to within rounding.

verify_forward returns a StateMark after each row, so the caller can rewind to any accepted prefix in O(1):
the KDA marks hold that row's (conv, recurrent) arrays, the MLA marks the cache length (state_io.rewind).
"""

from __future__ import annotations

import mlx.core as mx
from metal_kernels import usable

from ..errors import KimiError
from ..ops.kda_decode import (decode_path, decode_rows_kernel, decode_rows_ops, decode_step_gates_kernel,
                               kda_decode_step, rows_path)
from ..state import CACHE_GROUP_SIZE, KDAState, LatentCache, ModelState, check_context, encode_rows, positions
from ..state_io import StateMark

MAX_VERIFY = 16  # rows a verification forward takes (the drafts + 1); beyond this a prefill step pays


def kda_rows(attn, x: mx.array, s: KDAState) -> tuple[mx.array, list[tuple[mx.array, mx.array]]]:
    """KimiDeltaAttention over T rows as T decode steps: (output [B, T, dim], [(conv, recurrent)] after each
    row). s holds the state after the last row."""
    B, T, _ = x.shape
    H, D = attn.num_heads, attn.head_dim
    path = decode_path(s.recurrent, attn.conv_weight)
    after = []
    if path == "ref":  # decode's reference is the unfused layer one token at a time
        outs = []
        for t in range(T):
            outs.append(attn(x[:, t : t + 1], s))
            after.append((s.conv, s.recurrent))
        return mx.concatenate(outs, axis=1), after
    qkv = attn.qkv_proj(x)
    ys = []
    if path == "kernel" and rows_path(s.recurrent, attn.conv_weight, T) == "rows":  # one launch for all T
        f_b, g_b, b_logit = attn.decode_gates(x)
        y, after = decode_rows_kernel(qkv, f_b, b_logit, *attn._step_rest(s), g_b, attn.o_norm_weight, attn.norm_eps)
        s.conv, s.recurrent = after[-1]
        return attn.o_proj(y.reshape(B, T, H * D)), after
    if path == "kernel" and attn.gates_kernel_applies(s):
        gates = attn.gates_in(x)
        for t in range(T):
            y, s.recurrent, s.conv = decode_step_gates_kernel(
                qkv[:, t], gates[:, t], *attn._step_rest(s), attn.f_b_proj, attn.g_b_proj, attn.o_norm_weight,
                attn.norm_eps)
            ys.append(y)
            after.append((s.conv, s.recurrent))
    else:
        step_path = "ops" if path == "kernel" and not usable("kda_decode") else path
        f_b, g_b, b_logit = attn.decode_gates(x)
        if step_path == "ops":  # the conv, norms, gates and output gate of all T rows at once
            y, after = decode_rows_ops(qkv, f_b, b_logit, *attn._step_rest(s), g_b, attn.o_norm_weight,
                                       attn.norm_eps)
            s.conv, s.recurrent = after[-1]
            return attn.o_proj(y.reshape(B, T, H * D)), after
        for t in range(T):
            y, s.recurrent, s.conv = kda_decode_step(step_path, qkv[:, t], f_b[:, t], b_logit[:, t],
                                                     *attn._step_rest(s), g_b[:, t], attn.o_norm_weight,
                                                     attn.norm_eps)
            ys.append(y)
            after.append((s.conv, s.recurrent))
    return attn.o_proj(mx.stack(ys, axis=1).reshape(B, T, H * D)), after


def mla_projections(attn, x: mx.array) -> tuple[mx.array, mx.array]:
    """KimiMLA._project's one-token form over T rows: (queries [B, H, T, nope + pe], cache rows [B, T, W])."""
    from ..ops.attention import cache_rows

    B, T, _ = x.shape
    n = attn.num_heads * (attn.nope + attn.pe)
    if "q_kv" in attn:
        y = attn.q_kv(x)
        q, ckv = y[..., :n], y[..., n:]
    else:
        q, ckv = attn.q_proj(x), attn.kv_a_proj_with_mqa(x)
    q = q.reshape(B, T, attn.num_heads, attn.nope + attn.pe).transpose(0, 2, 1, 3)
    return q, cache_rows(ckv, attn.kv_a_layernorm.weight, attn.kv_a_layernorm.eps, attn.latent_rank)


def mla_rows(attn, x: mx.array, s) -> mx.array:
    """KimiMLA over T rows as T decode steps, one a row (each row's query over the cache and the rows before
    it): the path for rows that do not all land in one page (mla_page_slot), or a cache still empty."""
    from ..ops.attention import mla_attention

    B, T, _ = x.shape
    q, rows = mla_projections(attn, x)
    outs = []
    for t in range(T):
        qt, rt = q[:, :, t : t + 1], rows[:, t : t + 1]
        slot = s.decode_slot()
        if slot is None:  # an empty cache: the first row appends as the layer does
            o = mla_attention(qt, s.append(rt), attn.k_up.astype(x.dtype), attn.v_up.astype(x.dtype), attn.scale)
        else:
            o, last = attn.decode_row(qt, rt, slot.pages, slot.row)
            s.commit_decode(last)
        outs.append(o)
    o = mx.concatenate(outs, axis=2)  # [B, H, T, v]
    return attn.o_proj(o.transpose(0, 2, 1, 3).reshape(B, T, attn.num_heads * attn.v_dim))


def mla_page_slot(s, T: int) -> tuple[tuple, mx.array] | None:
    """(the pages a decode step would read, the rows [T] of the last page the T new rows go to) where all T fall
    in that page (MLAState.decode_slot's page for the first), else None. Writes nothing."""
    slot = s.decode_slot()
    if slot is None:
        return None
    size = slot.pages[-1][0].shape[1]
    row0 = s.length - (sum(p[0].shape[1] for p in slot.pages) - size)
    if row0 + T > size:
        return None
    return slot.pages, positions(size)[row0 : row0 + T]


def mla_rows_one_page(attn, x: mx.array, pages: tuple, at: mx.array) -> tuple[mx.array, tuple]:
    """KimiMLA over T rows whose cache rows go to rows `at` of the last of `pages` (mla_page_slot): all T queries
    in one attention, query t masked past row at[t] (mla_decode's matmul path, ops/mla_decode._decode_pages,
    with a mask row a query). at: [T] for every sequence, or [B, T] a sequence's own rows (a ragged batch's
    slots, each at its own length). Returns (output [B, T, dim], the last page with the rows written)."""
    from ..ops.attention import _absorb
    from ..ops.mla_decode import _decode_pages

    B, T, _ = x.shape
    q, rows = mla_projections(attn, x)
    H = q.shape[1]
    *before, last = pages
    at = at.reshape(-1, T)  # [1 or B, T]
    bits = last[0].shape[-1] * 32 // rows.shape[-1] if len(last) > 1 else 0
    new = encode_rows(rows, bits, last[0].dtype)
    last = tuple(mx.put_along_axis(p, at[..., None], r, axis=1) for p, r in zip(last, new))
    cache = LatentCache((*before, last), bits, CACHE_GROUP_SIZE)
    absorb, values = attn.get("q_absorb"), attn.get("v_absorb")
    k_up, v_up = attn.k_up.astype(q.dtype), attn.v_up.astype(q.dtype)
    qa = q @ absorb.swapaxes(-1, -2) if absorb is not None else _absorb(q, k_up) * attn.scale  # [B, H, T, W]
    W = qa.shape[-1]
    # query (h, t) of sequence b sees the last page up to row at[b, t]
    seen = mx.broadcast_to(at[:, None], (at.shape[0], H, T)).reshape(at.shape[0], H * T, 1)
    o = _decode_pages(qa.reshape(B, H * T, W), cache, seen, q.dtype).astype(q.dtype).reshape(B, H, T, W)
    L = k_up.shape[2]
    o = o @ values.swapaxes(-1, -2) if values is not None else o[..., :L] @ v_up.swapaxes(-1, -2)
    return attn.o_proj(o.transpose(0, 2, 1, 3).reshape(B, T, H * attn.v_dim)), last


def ffn_rows(mlp, x: mx.array) -> mx.array:
    """The FFN over T rows on the path a one-token step takes (a fused MoE's decode expert path)."""
    from .fuse import FusedMoE

    if isinstance(mlp, FusedMoE) and not getattr(mlp, "host_routed", False):
        return mlp(x, path=mlp.path(x.shape[0] * x.shape[1], decode=True))
    # a dense MLP or the unfused MoE: row-wise whatever the token count; streamed experts (model/offload.py) take
    # their own path for T tokens (the pool's reads follow the routing; rows there are decode's to rounding)
    return mlp(x)


def _kda_layer_step(model, i: int, first: bool, compiled: bool):
    """KDA layer i over T rows as a function of arrays, (h, [r,] conv, recurrent) -> (h, r, [conv after each
    row], [recurrent after each row]), as DecoderLayer.kda_step is for one; under mx.compile (traced once per T,
    as decode's steps are) unless the model runs its steps eagerly. first: the layer takes no r (model input)."""
    cache = model.__dict__.setdefault("_verify_steps", {})
    key = (i, first, compiled)
    if key not in cache:
        layer = model.model.layers[i]

        def step(h, *rest):
            r, conv, recurrent = (None, *rest) if first else rest
            s = KDAState(conv, recurrent)
            h, x = layer._seam(h, r, layer.input_layernorm)
            a, after = kda_rows(layer.self_attn, x, s)
            h, x = layer._seam(h, a, layer.post_attention_layernorm)
            return h, ffn_rows(layer.mlp, x), [c for c, _ in after], [q for _, q in after]

        cache[key] = mx.compile(step) if compiled else step
    return cache[key]


def _mla_layer_step(model, i: int, first: bool, compiled: bool):
    """MLA layer i over T rows that land in one page, as a function of arrays: (h, [r,] pages, at) -> (h, r,
    the last page written); compiled like _kda_layer_step (traced again when a page grows, as decode's step)."""
    cache = model.__dict__.setdefault("_verify_steps", {})
    key = ("mla", i, first, compiled)
    if key not in cache:
        layer = model.model.layers[i]

        def step(h, *rest):
            r, pages, at = (None, *rest) if first else rest
            h, x = layer._seam(h, r, layer.input_layernorm)
            a, last = mla_rows_one_page(layer.self_attn, x, pages, at)
            h, x = layer._seam(h, a, layer.post_attention_layernorm)
            return h, ffn_rows(layer.mlp, x), last

        cache[key] = mx.compile(step) if compiled else step
    return cache[key]


def verify_forward(model, tokens: list[int], state: ModelState) -> tuple[mx.array, list[StateMark]]:
    """Feed tokens (1..MAX_VERIFY) into state as that many decode steps would: (logits [T, vocab], the StateMark
    after each row). state ends holding all of them; rewind it to marks[j] to keep the first j + 1."""
    if model.pipeline is not None:
        raise KimiError("speculative decoding runs on one machine; drop the draft or run without --distributed")
    if state.batch_size != 1:
        raise KimiError("speculative decoding runs one sequence at a time; drop the draft for batched generation")
    T = len(tokens)
    if not 1 <= T <= MAX_VERIFY:
        raise KimiError(f"a verification forward takes 1 to {MAX_VERIFY} tokens, got {T}")
    check_context(state, T, model.config.max_position_embeddings)
    layers = model.model.layers
    h = model.model.embed_tokens(mx.array([tokens]))
    r = None  # the FFN output not yet added to h, as in Model._decode_each
    kda_after, mla_before = {}, {}
    # compiled as decode's steps are, unless a layer reads its routing back to the host (streamed experts)
    compiled = model.compile_decode and not model.eager_steps and not any(
        getattr(layers[i].mlp, "host_routed", False) for i in model.owned)
    for i in model.owned:
        layer, s = layers[i], state.layers[i]
        if layer.is_kda:
            step = _kda_layer_step(model, i, r is None, compiled)
            h, r, convs, recs = step(h, s.conv, s.recurrent) if r is None else step(h, r, s.conv, s.recurrent)
            kda_after[i] = list(zip(convs, recs))
            s.conv, s.recurrent = convs[-1], recs[-1]
            continue
        mla_before[i] = s.length
        slot = mla_page_slot(s, T)
        if slot is not None:
            step = _mla_layer_step(model, i, r is None, compiled)
            h, r, last = step(h, *slot) if r is None else step(h, r, *slot)
            s.pages = s.pages[:-1] + (last,)
            s.length += T
            continue
        h, x = layer._seam(h, r, layer.input_layernorm)
        a = mla_rows(layer.self_attn, x, s)
        h, x = layer._seam(h, a, layer.post_attention_layernorm)
        r = ffn_rows(layer.mlp, x)
    logits = model.logits(model.final_norm(h, r))[0]
    offset = state.offset
    state.offset += T
    marks = []
    for t in range(T):
        saved = [KDAState(*kda_after[i][t]) if i in kda_after else mla_before[i] + t + 1
                 for i in range(len(state.layers))]
        marks.append(StateMark(saved, offset + t + 1))
    return logits, marks



def verify_batch(model, tokens: mx.array, batch) -> tuple[mx.array, dict]:
    """Feed tokens [C, T] (T = 2..MAX_VERIFY) into every slot of a ragged batch (batch_state.BatchState, C its
    capacity), each slot at its own length, as T decode steps would: (logits [C, T, vocab], {KDA layer: ([conv
    after each row], [recurrent after each row])}). The same layer steps as verify_forward's, over C sequences:
    each slot's rows land in its page from its own length on (mla_rows_one_page with a row per slot), and a
    slot's results depend on its rows alone. The MLA rows are written but not counted: batch.keep() then takes,
    per slot, the state after the rows it keeps."""
    if model.pipeline is not None:
        raise KimiError("speculative decoding runs on one machine; drop the draft or run without --distributed")
    C, T = tokens.shape
    batch.prepare(T)  # (the caller prepared it for T already: its capacity is the one the tokens were laid out for)
    if not 2 <= T <= MAX_VERIFY or C != batch.capacity:
        raise KimiError(f"a batched verification takes {batch.capacity} rows of 2 to {MAX_VERIFY} tokens, "
                        f"got {C} of {T}")
    at = batch.rows_in.reshape(C, 1) + mx.arange(T, dtype=mx.int32)  # [C, T]: the page rows each slot writes
    layers = model.model.layers
    compiled = model.compile_decode and not model.eager_steps and not any(
        getattr(layers[i].mlp, "host_routed", False) for i in model.owned)
    h = model.model.embed_tokens(tokens)
    r = None
    after = {}
    for i in model.owned:
        s = batch.layers[i]
        if layers[i].is_kda:
            step = _kda_layer_step(model, i, r is None, compiled)
            h, r, convs, recs = step(h, s.conv, s.recurrent) if r is None else step(h, r, s.conv, s.recurrent)
            after[i] = (convs, recs)
            continue
        step = _mla_layer_step(model, i, r is None, compiled)
        h, r, last = step(h, (s.page,), at) if r is None else step(h, r, (s.page,), at)
        s.page = tuple(last)
    return model.logits(model.final_norm(h, r)), after
