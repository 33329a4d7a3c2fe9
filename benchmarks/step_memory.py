"""Memory and time of consecutive prefill steps at a long context, under the settings that bound them.

  python benchmarks/step_memory.py --shape full --context 696320 --steps 10 --runs 1024,512,off

The MLA caches are filled with random rows up to the context, then --steps steps of --step tokens run one
after another, as in a long prompt. Each run names its TILES setting: the megabytes over the call's start past
which the attention tile loop waits for MLX to free finished work (ops.attention.FREE_SLACK; "off": never
waits). Working set = a step's peak minus the memory in use before it.
--trace runs steps layer by layer and names the layers that held the most in each step. Pacing and the trace
apply where steps are paced (a GPU: model.decoder.PACED_ON).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from kimi_mlx import bench  # noqa: E402
from kimi_mlx.ops import attention  # noqa: E402
from results import Recorder  # noqa: E402


def runs(text: str) -> list:
    """'default' or TILES (MB or off), comma-separated -> [None (as shipped) or (slack,)]."""
    out = []
    for tiles in text.split(","):
        if tiles == "default":
            out.append(None)
            continue
        if tiles != "off" and not tiles.isdigit():
            raise argparse.ArgumentTypeError(f"{tiles!r} is neither 'default', a whole number of MB nor 'off'")
        out.append((None if tiles == "off" else int(tiles) << 20,))
    return out


ap = argparse.ArgumentParser()
ap.add_argument("--shape", default="full", choices=list(bench.SHAPES))
ap.add_argument("--context", type=int, default=696320, help="the context after the first step")
ap.add_argument("--steps", type=int, default=10)
ap.add_argument("--step", type=int, default=2048)
ap.add_argument("--runs", type=runs, default="default",
                help="comma-separated TILES (MB or off); 'default' = as shipped")
ap.add_argument("--trace", action="store_true")
ap.add_argument("--record", action="store_true")
a = ap.parse_args()
echo = Recorder()
model, _, cfg = bench.build(a.shape, peer=False, dtype=bench.activation_dtype())
r = bench.Runner("kimi-mlx", model, True)
shipped = (attention.FREE_SLACK,)
echo(f"device: {bench.device_line()}; shape {a.shape}; {a.steps} steps of {a.step} tokens from context "
     f"{a.context - a.step} (MLA caches filled with random rows)")
for run in a.runs:
    (tiles,) = run or shipped
    attention.FREE_SLACK = tiles
    r.fill_context(a.context - a.step, model.config)
    steps = [bench.measured_step(model, r.state, mx.random.randint(0, cfg["vocab_size"], (1, a.step)), a.trace)
             for _ in range(a.steps)]
    held = [m.held_gb for m in steps]
    name = "off" if tiles is None else str(tiles >> 20)
    echo(f"tiles wait past MB {name:>5}: {np.mean([m.seconds for m in steps]):.2f} s a step; working set "
         f"median {np.median(held):.2f}, max {max(held):.2f} GB: " + " ".join(f"{x:.2f}" for x in held))
    if a.trace and any(m.layers for m in steps):  # traced layers exist where steps are paced (a GPU)
        for i, m in enumerate(steps):
            echo(f"  step {i}: {m.held_gb:.2f} GB; most held during layers {m.top_layers(model)}")
    r.state = None
    mx.clear_cache()
(attention.FREE_SLACK,) = shipped
if a.record:
    echo.append("Consecutive prefill steps at a long context (benchmarks/step_memory.py)")
