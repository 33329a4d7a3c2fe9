"""Every kernel instantiation the ops wrappers make at the real Kimi-Linear-48B-A3B shapes: each wrapper called on
lazy zeros (never evaluated) with metal_kernels.kernel replaced by a recorder, over the quantizations the
kernels take (2/4/8 bits x groups of 32/64/128), decode batches, prefill steps and MLA page sizes. What a
launch looks like to MLX: template values, each input's dtype, element count and dimensions (MLX's Metal
signature passes inputs of fewer than 8 elements in the constant address space), outputs, grid and threadgroup.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, partial

import mlx.core as mx
import mlx.nn as nn

DTYPES = {mx.float32: "float32", mx.bfloat16: "bfloat16", mx.float16: "float16", mx.int32: "int32",
          mx.uint32: "uint32"}
BITS = (2, 4, 8)
GROUPS = (32, 64, 128)
D, I, E, K = 2304, 1024, 256, 8  # hidden, expert width, routed experts, picks (+1 shared)
H, DK = 32, 128  # KDA heads, head dim
MLA_H, L, PE = 32, 512, 64  # MLA heads, latent rank, rope dims
DECODE_BATCHES = (1, 4, 16)  # 16: a batch's per-sequence inputs (MLA decode's last rows) pass in device memory
PREFILL_TOKENS = (2048, 4096)
PAGES = (256, 2048, 8192, 16384, 131072)  # MLA page rows: first page, page-kernel sizes, the split kernels'


@dataclass(frozen=True)
class Launch:
    name: str
    template: tuple[tuple[str, int], ...]
    inputs: tuple[tuple[str, int, int], ...]  # (dtype, elements, ndim)
    outputs: tuple[str, ...]
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]


class _Recorder:
    def __init__(self):
        self.launches: list[Launch] = []

    def __call__(self, name):
        def run(inputs, template, grid, threadgroup, output_shapes, output_dtypes):
            self.launches.append(Launch(name, tuple((k, int(v)) for k, v in template),
                                        tuple((DTYPES[x.dtype], x.size, x.ndim) for x in inputs),
                                        tuple(DTYPES[d] for d in output_dtypes), tuple(grid), tuple(threadgroup)))
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]
        return run


def _qlinear(n_in, n_out, bits, gs):
    lin = nn.QuantizedLinear.__new__(nn.QuantizedLinear)
    nn.Module.__init__(lin)
    lin.bits, lin.group_size, lin.mode = bits, gs, "affine"
    lin.weight = mx.zeros((n_out, n_in * bits // 32), mx.uint32)
    lin.scales = mx.zeros((n_out, n_in // gs), mx.bfloat16)
    lin.biases = mx.zeros((n_out, n_in // gs), mx.bfloat16)
    return lin


def _bank(experts, rows, cols, bits, gs):
    from kimi_mlx.model.moe import QuantizedSwitchLinear

    b = QuantizedSwitchLinear.__new__(QuantizedSwitchLinear)
    nn.Module.__init__(b)
    b.bits, b.group_size, b.mode = bits, gs, "affine"
    b.weight = mx.zeros((experts, rows, cols * bits // 32), mx.uint32)
    b.scales = mx.zeros((experts, rows, cols // gs), mx.bfloat16)
    b.biases = mx.zeros((experts, rows, cols // gs), mx.bfloat16)
    return b


def _calls():
    """Each wrapper at the real shapes (what decode and prefill launch), as thunks."""
    from kimi_mlx.ops import attention, experts, kda, kda_chunked, kda_decode, mla_decode, norm, routing

    z, bf, f32, i32 = mx.zeros, mx.bfloat16, mx.float32, mx.int32
    C3, W = 3 * H * DK, L + PE
    opts = dict(top_k=K, n_group=1, topk_group=1, renormalize=True, scaling=2.446, shared=1)
    for B in DECODE_BATCHES:
        state, conv_w = z((B, H, DK, DK), f32), z((4, C3), bf)
        step = dict(qkv=z((B, C3), bf), conv_tail=z((B, 3, C3), bf), conv_w=conv_w, a_log=z((H,), f32),
                    dt_bias=z((H * DK,), f32), state=state, norm_w=z((DK,), f32), eps=1e-5)
        yield lambda s=step, B=B: kda_decode.decode_step_kernel(**s, gate_a=z((B, H * DK), bf),
                                                                beta_logit=z((B, H), bf), gate_b=z((B, H * DK), bf))
        for bits in BITS:
            for gs in GROUPS:
                yield lambda s=step, B=B, bits=bits, gs=gs: kda_decode.decode_step_gates_kernel(
                    **s, gates=z((B, 2 * DK + H), bf), f_b=_qlinear(DK, H * DK, bits, gs),
                    g_b=_qlinear(DK, H * DK, bits, gs))
        for T in (2, 9, 16):  # a speculative verification's widths
            yield lambda s=step, B=B, T=T: kda_decode.decode_rows_kernel(
                **{**s, "qkv": z((B, T, C3), bf)}, gate_a=z((B, T, H * DK), bf), beta_logit=z((B, T, H), bf),
                gate_b=z((B, T, H * DK), bf))
        yield lambda B=B: norm.add_norm_kernel(z((B, 1, D), bf), z((B, 1, D), f32), z((D,), bf), 1e-5)
        yield lambda B=B: routing.logits_kernel(z((B, D), bf), z((E, D), f32))
        yield lambda B=B: routing.route_kernel(z((B, E), f32), z((E,), f32), **opts)
        yield lambda B=B: attention.cache_rows_kernel(z((B, 1, W), bf), z((L,), bf), 1e-6, L)
        for bits in BITS:
            for gs in GROUPS:
                gate_up, down = _bank(E + 1, 2 * I, D, bits, gs), _bank(E + 1, D, I, bits, gs)
                idx, w = z((B, K + 1), i32), z((B, K + 1), f32)
                yield lambda B=B, g=gate_up, d=down, idx=idx, w=w: experts.experts_kernel(z((B, D), bf), idx, w, g, d)
                yield lambda B=B, g=gate_up, d=down, idx=idx, w=w: experts.experts_kernel(z((B, D), bf), idx, w, g, d,
                                                                                  union=True)
                yield lambda B=B, g=gate_up, d=down, idx=idx, w=w: experts.experts_kernel(z((B, D), bf), idx, w, g, d,
                                                                                  wide=True)
                yield lambda B=B, g=gate_up, d=down, idx=idx, w=w: experts.experts_kernel(z((B, D), f32), idx, w, g, d,
                                                                                  wide=True)  # float rows: 2 loads of 8
        for n in PAGES:
            qa, last = z((B, MLA_H, W), bf), z((B,), i32)  # a last row per sequence (a ragged batch)
            if n <= mla_decode.PAGE_KERNEL_ROWS:
                yield lambda qa=qa, n=n, last=last, B=B: mla_decode.decode_page_kernel(qa, z((B, n, W), bf), last)
            c = min(mla_decode.SPLIT_ROWS, n)
            yield lambda n=n, c=c, last=last, B=B: mla_decode.decode_chunks_kernel(z((B, MLA_H, n), bf), last, c)
            yield lambda n=n, c=c, B=B: mla_decode.decode_merge_kernel(
                z((B, n // c, MLA_H, W), f32), z((B, n // c, MLA_H), f32), z((B, n // c, MLA_H), f32), bf)
    for T in PREFILL_TOKENS:
        n = T // kda_chunked.CHUNK
        for intra in kda_chunked.INTRAS:
            yield lambda n=n, intra=intra: kda_chunked.intra_chunk_kernel(
                *(z((n, 1, H, kda_chunked.CHUNK, DK), f32) for _ in range(3)), z((n, 1, H, kda_chunked.CHUNK), f32),
                intra)
        u = z((n, 1, H, kda_chunked.CHUNK, DK), f32)
        yield lambda n=n, u=u: kda_chunked.scan_kernel(u, u, u, u, z((n, 1, H, DK), f32), z((1, H, DK, DK), f32))
        yield lambda n=n, u=u: kda_chunked.scan_mma(u, u, u, u, z((n, 1, H, DK), f32), z((1, H, DK, DK), f32))
        yield lambda T=T: kda.gated_norm_kernel(z((1, T, H, DK), f32), z((1, T, H, DK), bf), z((DK,), f32), 1e-5, bf)
        yield lambda T=T: attention.cache_rows_kernel(z((1, T, W), bf), z((L,), bf), 1e-6, L)


@cache
def launches() -> tuple[Launch, ...]:
    """Every distinct launch (name, template, input and output types and passing) the wrappers make."""
    import metal_kernels

    rec = _Recorder()
    real = metal_kernels.kernel
    metal_kernels.kernel = lambda name: partial(metal_kernels.launch, name, rec(name))
    try:
        for call in _calls():
            call()
    finally:
        metal_kernels.kernel = real
    return tuple(dict.fromkeys(rec.launches))
