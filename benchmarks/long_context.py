"""Long-context memory: the MLA working set stays bounded as the context grows (CPU-measurable).

Three parts, each printed as a table (append to RESULTS.md with --record):
  model   a small random hybrid model prefilled to N tokens in steps; peak memory minus weights minus
          the state (MLA caches + KDA state) is the working set, for kimi-mlx's paths and for one SDPA
          over the whole cache (KIMI_MLX_MLA=fused, what an untiled implementation does)
  layer   one MLA layer at the real shape (H 32, latent 512 + 64, nope 128, v 128): the working set of
          one prefill step of 2,048 tokens (--layer-step) and of one decode token, against caches up to 1,048,576 rows
  quant   logit error of an 8-bit and a 4-bit latent cache against the unquantized one (small model)

  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python benchmarks/long_context.py --record
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from kimi_mlx.config import ModelConfig  # noqa: E402
from kimi_mlx.model import Model  # noqa: E402
from kimi_mlx.model.mla import KimiMLA  # noqa: E402
from kimi_mlx.ops import attention as A  # noqa: E402
from kimi_mlx.state import MLAState  # noqa: E402
from results import Recorder  # noqa: E402

MB = 1e6
SMALL = dict(  # 8 layers, 2 of them MLA; cache row 128 + 64 = 192 values (3 quantization groups)
    model_type="kimi_linear", vocab_size=4096, hidden_size=256, num_hidden_layers=8, intermediate_size=512,
    num_attention_heads=8, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64,
    num_experts=16, num_experts_per_token=4, num_shared_experts=1, moe_intermediate_size=128,
    first_k_dense_replace=1, routed_scaling_factor=2.446,
    linear_attn_config={"kda_layers": [1, 2, 3, 5, 6, 7], "full_attn_layers": [4, 8], "num_heads": 4,
                        "head_dim": 64, "short_conv_kernel_size": 4},
)
REAL_MLA = dict(hidden_size=2304, num_attention_heads=32, kv_lora_rank=512, qk_nope_head_dim=128,
                qk_rope_head_dim=64, v_head_dim=128)
BYTES_PER_TOKEN_REAL = 7 * 576 * 2  # 7 MLA layers, bf16


def small_model(seed=0) -> Model:
    mx.random.seed(seed)
    model = Model(ModelConfig.from_dict(SMALL))
    for layer in model.model.layers:
        if not layer.is_kda:
            attn = layer.self_attn
            attn.k_up = 0.1 * mx.random.normal(attn.k_up.shape)
            attn.v_up = 0.1 * mx.random.normal(attn.v_up.shape)
    mx.eval(model.parameters())
    return model


def measure(fn):
    """(result, seconds, peak bytes above the memory in use before fn)."""
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, mx.get_peak_memory() - base


def prefill(model, n, step, cache_bits=0, seed=0):
    """Feed n random tokens in steps (as feed.prefill does); returns the state and last logits."""
    toks = np.random.default_rng(seed).integers(0, SMALL["vocab_size"], (1, n))
    state = model.new_state(cache_bits=cache_bits)
    logits = None
    for a in range(0, n, step):
        h = model.hidden(mx.array(toks[:, a : a + step]), state)
        logits = model.logits(h[:, -1:])
        mx.eval(logits, list(state.arrays().values()))
    return state, logits


def allocated(state) -> int:
    """Bytes the state holds, MLA pages at full capacity."""
    mla = [s for s in state.layers if isinstance(s, MLAState)]
    pages = sum(a.nbytes for s in mla for page in s.pages for a in page)
    return state.nbytes - sum(sum(a.nbytes for a in s.arrays().values()) for s in mla) + pages


def part_model(lengths, step, fused_max, echo):
    model = small_model()
    A.TILE_BYTES = 8 << 20  # the real-shape tile (64 MB = 256 keys at 2,048 queries x 32 heads) scaled
    echo(f"model: hidden 256, 6 KDA + 2 MLA layers (8 heads, cache row 192 f32 = 1,536 B/token), MoE 16x4; "
         f"prefill steps of {step}; TILE_BYTES {A.TILE_BYTES >> 20} MB")
    echo("| N | path | prefill tok/s | peak above weights MB | state MB valid / allocated | working set MB |")
    echo("|---|---|---|---|---|---|")
    for n in lengths:
        for path in ("auto", "fused"):
            if path == "fused" and n > fused_max:
                continue
            os.environ[A.ENV] = path
            (state, _), secs, peak = measure(lambda: prefill(model, n, step))
            held = allocated(state)
            echo(f"| {n:,} | {path} | {n / secs:,.0f} | {peak / MB:,.0f} | {state.nbytes / MB:,.1f} / {held / MB:,.1f} | "
                 f"{(peak - held) / MB:,.0f} |")
            del state
    os.environ.pop(A.ENV, None)
    A.TILE_BYTES = 1 << 26


def real_layer(dtype, seed=0) -> KimiMLA:
    mx.random.seed(seed)
    cfg = ModelConfig.from_dict({**SMALL, **REAL_MLA})
    layer = KimiMLA(cfg)
    layer.k_up = 0.02 * mx.random.normal(layer.k_up.shape)
    layer.v_up = 0.02 * mx.random.normal(layer.v_up.shape)
    layer.set_dtype(dtype)
    mx.eval(layer.parameters())
    return layer


def filled(S, dtype):
    st = MLAState()
    for a in range(0, S, 32768):
        st.append(mx.random.normal((1, min(32768, S - a), 576)).astype(dtype))
        mx.eval(list(st.arrays().values()))
    return st


def part_layer(prefill_contexts, decode_contexts, dtype, echo, step=2048):
    layer = real_layer(dtype)
    echo(f"layer: one MLA layer at the real shape, {dtype}, TILE_BYTES {A.TILE_BYTES >> 20} MB; working set = "
         "peak above (weights + cache before the call); decode: mean of 4 tokens after one warm-up")
    echo("| call | context S | tiling | seconds per call | working set MB |")
    echo("|---|---|---|---|---|")
    for T, contexts in ((step, prefill_contexts), (1, decode_contexts)):
        for S in contexts:
            st = filled(S - T, dtype)
            x = mx.random.normal((1, T, 2304)).astype(dtype)
            mx.eval(x)
            reps = 1 if T > 1 else 5
            _, secs, peak = measure(lambda: [mx.eval(layer(x, st)) for _ in range(reps)])
            if reps > 1:  # time the last 4 (the first warms up)
                st.length -= reps
                mx.eval(layer(x, st))
                t0 = time.perf_counter()
                for _ in range(reps - 1):
                    mx.eval(layer(x, st))
                secs = (time.perf_counter() - t0) / (reps - 1)
            t = A.choose_tiling(1, 32, T, S)
            echo(f"| T={T:,} | {S:,} | {t.query_chunk} x {t.tile_keys} | {secs:.4f} | {peak / MB:,.0f} |")
            del st


def part_quant(n, step, echo):
    model = small_model(seed=1)
    (exact, ex_logits), _, _ = measure(lambda: prefill(model, n, step))
    toks = mx.array(np.random.default_rng(5).integers(0, SMALL["vocab_size"], (1, 32)))
    echo(f"quant: small model, {n:,}-token prompt in steps of {step}, then 32 decode tokens; errors relative to the "
         "unquantized cache (random weights: MoE routing flips make the max error spiky, KL and top-1 are steadier)")
    echo("| cache | bytes/token/layer | real shape, 1M tokens | max abs err / max logit | mean KL | top-1 agree |")
    echo("|---|---|---|---|---|---|")
    ref = mx.concatenate([ex_logits] + [model(toks[:, i : i + 1], exact) for i in range(32)], axis=1)
    for bits in (0, 8, 4):
        state, logits = prefill(model, n, step, cache_bits=bits)
        out = mx.concatenate([logits] + [model(toks[:, i : i + 1], state) for i in range(32)], axis=1)
        mla = [s for s in state.layers if isinstance(s, MLAState)]
        per_tok = sum(sum(a.nbytes for a in s.arrays().values()) for s in mla) / len(mla) / state.offset
        real = 7 * 1048576 * (576 * 2 if not bits else 576 * bits / 8 + 9 * 2 * 2)
        p, q = mx.softmax(ref, -1), mx.softmax(out, -1)
        kl = float((p * (mx.log(p + 1e-30) - mx.log(q + 1e-30))).sum(-1).mean())
        agree = float((mx.argmax(ref, -1) == mx.argmax(out, -1)).mean())
        err = float(mx.abs(out - ref).max() / mx.abs(ref).max())
        echo(f"| {'bf16/f32' if not bits else f'{bits}-bit'} | {per_tok:,.0f} (f32 run) | {real / 2**30:.2f} GiB | "
             f"{err:.4f} | {kl:.2e} | {agree:.3f} |")


def ints(s):
    return [int(x) for x in s.split(",") if x]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="model,layer,quant")
    ap.add_argument("--lengths", type=ints, default=[4096, 8192, 16384, 32768])
    ap.add_argument("--step", type=int, default=1024)
    ap.add_argument("--fused-max", type=int, default=16384)
    ap.add_argument("--prefill-contexts", type=ints, default=[4096, 16384])
    ap.add_argument("--decode-contexts", type=ints, default=[65536, 262144, 1048576])
    ap.add_argument("--layer-step", type=int, default=2048, help="tokens of the real-shape layer's prefill call")
    ap.add_argument("--quant-tokens", type=int, default=2048)
    ap.add_argument("--dtype", default="float32", help="of the real-shape layer part (bfloat16 on a GPU)")
    ap.add_argument("--record", action="store_true", help="append to benchmarks/RESULTS.md")
    a = ap.parse_args()
    echo = Recorder()

    blas = "OpenBLAS (LD_PRELOAD)" if "openblas" in os.environ.get("LD_PRELOAD", "") else "MLX's bundled BLAS"
    echo(f"device: {mx.default_device()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
         f"{blas}, mlx {mx.__version__}")
    parts = a.parts.split(",")
    if "model" in parts:
        part_model(a.lengths, a.step, a.fused_max, echo)
    if "layer" in parts:
        part_layer(a.prefill_contexts, a.decode_contexts, getattr(mx, a.dtype), echo, a.layer_step)
    if "quant" in parts:
        part_quant(a.quant_tokens, a.step, echo)
    if a.record:
        echo.append("Long context (MLA working set)")


if __name__ == "__main__":
    main()
