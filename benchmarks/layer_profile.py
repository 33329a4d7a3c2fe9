"""Where one prefill step's time goes, sublayer by sublayer, ours against mlx-lm on the same random weights.

  python benchmarks/layer_profile.py --shape small --tokens 2048 --bits 0      (CPU: float32, unquantized)
  python benchmarks/layer_profile.py --shape full --tokens 2048                 (GPU: 4-bit, bf16)

Random tokens go through the model once to give every layer its real input (both models hold the same
weights, so the same inputs serve both); then each layer's attention and FFN halves run on their own from an
empty state (the first step of a prompt), evaluated and timed (median of --reps): ours as a prefill step runs
them (KDA attention compiled where the step length allows it), mlx-lm's modules as its model calls them.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from kimi_mlx import bench  # noqa: E402
from kimi_mlx.model.decoder import COMPILED_PREFILL_MULTIPLE  # noqa: E402
from results import Recorder  # noqa: E402


def timed(f, reps: int) -> float:
    """Median milliseconds of f() evaluated (after one untimed call)."""
    mx.eval(f())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(f())
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def ours_attention(model, i: int, h: mx.array):
    layer = model.model.layers[i]
    compiled = layer.is_kda and model.compile_prefill and h.shape[1] % COMPILED_PREFILL_MULTIPLE == 0
    step = layer.compiled_kda_attention() if compiled else None

    def run():
        s = model.new_state(1).layers[i]
        if step is not None:
            return step(h, s.conv, s.recurrent)[0]
        return layer.attend(h, s)
    return run


def peer_attention(model, i: int, h: mx.array):
    from mlx_lm.models.base import create_attention_mask

    layer = model.model.layers[i]
    mask = None if layer.is_linear else create_attention_mask(h, None, return_array=True)
    return lambda: h + layer.self_attn(layer.input_layernorm(h), mask, model.make_cache()[i])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="small", choices=list(bench.SHAPES))
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--bits", type=int, default=4, help="0 = unquantized")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--record", action="store_true", help="append to benchmarks/RESULTS.md")
    a = ap.parse_args()
    echo = Recorder()
    ours, theirs, cfg = bench.build(a.shape, a.bits, dtype=bench.activation_dtype(), peer=not a.no_peer)
    tokens = mx.random.randint(0, cfg["vocab_size"], (1, a.tokens))
    inputs, h, state = [], ours.model.embed_tokens(tokens), ours.new_state(1)
    for i, layer in enumerate(ours.model.layers):  # each layer's input, and its FFN half's
        mid = layer.attend(h, state.layers[i])
        inputs.append((h, mid))
        h = layer.ffn(mid)
        mx.eval(h, mid)
    echo(f"device: {bench.device_line()}; shape {a.shape}, {a.bits or 'unquantized'}"
         f"{'-bit' if a.bits else ''} random weights, {ours.dtype}; one {a.tokens}-token step of random tokens "
         f"from an empty state; ms, median of {a.reps}")
    echo(f"{'part':34s} {'kimi-mlx':>9s}" + (f" {'mlx-lm':>9s} {'ratio':>6s}" if theirs else ""))
    total = np.zeros(2)
    for i, (layer, (h, mid)) in enumerate(zip(ours.model.layers, inputs)):
        parts = [(f"layer {i:2d} {'KDA' if layer.is_kda else 'MLA'} attention", ours_attention(ours, i, h),
                  theirs and peer_attention(theirs, i, h)),
                 (f"layer {i:2d} {type(layer.mlp).__name__} FFN", lambda layer=layer, x=mid: layer.ffn(x),
                  theirs and (lambda p=theirs.model.layers[i], x=mid: x + p.mlp(p.post_attention_layernorm(x))))]
        for name, f, g in parts:
            t = np.array([timed(f, a.reps), timed(g, a.reps) if g else np.nan])
            total += t
            echo(f"{name:34s} {t[0]:9.1f}" + (f" {t[1]:9.1f} {t[1] / t[0]:5.2f}x" if g else ""))
    echo(f"{'all layers':34s} {total[0]:9.1f}" + (f" {total[1]:9.1f} {total[1] / total[0]:5.2f}x" if theirs else ""))
    if a.record:
        echo.append(f"Prefill step by sublayer, {a.shape} shape (benchmarks/layer_profile.py)")


if __name__ == "__main__":
    main()
