"""Decode tok/s with each layer compiled apart (KIMI_MLX_DECODE=layer) against all layers as one graph
(model), at several contexts, on the same random full-shape weights (kimi-mlx only).

  python benchmarks/decode_modes.py --contexts 1024,32768,131072 [--record]
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kimi_mlx import bench  # noqa: E402
from results import Recorder  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--shape", default="full", choices=list(bench.SHAPES))
ap.add_argument("--contexts", default="1024,32768,131072")
ap.add_argument("--tokens", type=int, default=32)
ap.add_argument("--record", action="store_true")
a = ap.parse_args()
echo = Recorder()
ours, _, cfg = bench.build(a.shape, peer=False, dtype=bench.activation_dtype())
echo(f"device: {bench.device_line()}; shape {a.shape}, random 4-bit weights; decode tok/s, {a.tokens} tokens")
r = bench.Runner("kimi-mlx", ours, True)
for n in map(int, a.contexts.split(",")):
    got = {}
    for mode in ("layer", "model"):
        os.environ["KIMI_MLX_DECODE"] = mode
        r.fill_context(n - a.tokens - 4, ours.config)
        got[mode] = bench.time_decode(r, a.tokens)
    echo(f"context {n:>8}: per-layer graphs {got['layer']:7.1f} | one graph {got['model']:7.1f} | "
         f"ratio {got['model'] / got['layer']:.2f}x")
if a.record:
    echo.append("decode: per-layer compiled steps vs one compiled graph")
