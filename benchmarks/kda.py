"""KDA recurrence speed per layer at H32 x D128: this project vs mlx-lm and MLX, in the same run.

  python benchmarks/kda.py                                 # this device, default lengths
  python benchmarks/kda.py --lengths 1,512,4096,8192,32768 --record out.md --commit abc1234

Each path starts from the same raw inputs (q, k, v, gate pre-activation a, beta logit b, A_log,
dt_bias, state) and does its own q/k L2 norms, gates and recurrence:
  kimi-mlx   chunked prefill (kimi_mlx/ops/kda_chunked.py) for T > 1; for T = 1 the fused decode
             step (Metal/CUDA kernel on a GPU, compiled ops on CPU), which also does the short conv
  mlx-lm     mlx_lm.models.gated_delta.gated_delta_update with KDA's per-channel gate (a Metal
             kernel on Apple GPUs; a per-token loop of ops elsewhere)
  mx.fast    mx.fast.gated_delta_update: a per-HEAD scalar gate only, so it computes a cheaper,
             different recurrence (not KDA); compare its speed only
Decode (T = 1) is timed as a chain of steps that feed each other's state, evaluated at the end.
"""

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402

from kimi_mlx.ops import kda as kda_ops  # noqa: E402
from kimi_mlx.ops.kda_decode import decode_step_kernel, decode_step_ops  # noqa: E402

H, D = 32, 128


def inputs(T, seed=0):
    mx.random.seed(seed)
    r = mx.random.normal
    x = dict(q=r((1, T, H, D)), k=r((1, T, H, D)), v=r((1, T, H, D)), a=r((1, T, H, D)), b=r((1, T, H)),
             a_log=mx.random.uniform(0.0, 2.0, (H,)), dt_bias=r((H * D,)), state=mx.zeros((1, H, D, D)))
    mx.eval(x)
    return x


def ours(x):
    g = -mx.exp(x["a_log"])[:, None] * kda_ops.softplus(x["a"] + x["dt_bias"].reshape(H, D))
    return kda_ops.kda(x["q"], x["k"], x["v"], g, mx.sigmoid(x["b"]), x["state"])


def mlx_lm(x):
    from mlx_lm.models.gated_delta import gated_delta_update, normalize_qk

    q, k = normalize_qk(x["q"], x["k"], inv_scale=D**-0.5, eps=1e-6)
    return gated_delta_update(q, k, x["v"], x["a"], x["b"], x["a_log"].reshape(H, 1),
                              x["dt_bias"].reshape(H, D), x["state"])


def mx_fast(x):
    from mlx_lm.models.gated_delta import normalize_qk

    q, k = normalize_qk(x["q"], x["k"], inv_scale=D**-0.5, eps=1e-6)
    gamma = mx.exp(-mx.exp(x["a_log"]) * kda_ops.softplus(x["a"][..., 0] + x["dt_bias"][::D]))
    return mx.fast.gated_delta_update(q, k, x["v"], gamma, mx.sigmoid(x["b"]), x["state"])


def step_inputs(seed=0):
    mx.random.seed(seed)
    r = mx.random.normal
    C3 = 3 * H * D
    x = dict(qkv=r((1, C3)), gate_a=r((1, H * D)), beta_logit=r((1, H)), conv_tail=r((1, 3, C3)),
             conv_w=0.5 * r((4, C3)), a_log=mx.random.uniform(0.0, 2.0, (H,)), dt_bias=r((H * D,)),
             state=mx.zeros((1, H, D, D)))
    mx.eval(x)
    return x


def time_prefill(fn, x, repeats):
    mx.eval(fn(x))  # warm-up (compiles kernels)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(fn(x))
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def time_decode(step, x, steps):
    """(wall, eval) seconds per step over a chain of dependent steps: wall includes building the
    graph in Python, eval only running it."""
    def build():
        state, tail = x["state"], x.get("conv_tail")
        outs = []
        for _ in range(steps):
            out = step(dict(x, state=state, conv_tail=tail))
            outs.append(out[0])
            state = out[1]
            tail = out[2] if len(out) > 2 else tail
        return outs, state

    mx.eval(build())
    t0 = time.perf_counter()
    graph = build()
    t1 = time.perf_counter()
    mx.eval(graph)
    t2 = time.perf_counter()
    return (t2 - t0) / steps, (t2 - t1) / steps


def decode_ours(x):
    step = decode_step_kernel if kda_ops.gpu_backend() else decode_step_ops
    return step(**{k: x[k] for k in ("qkv", "gate_a", "beta_logit", "conv_tail", "conv_w", "a_log", "dt_bias", "state")})


def blas_note():
    pre = os.environ.get("LD_PRELOAD", "")
    return "OpenBLAS (LD_PRELOAD)" if "openblas" in pre else "MLX's bundled BLAS"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default=None, help="comma list of T (1 = decode step)")
    ap.add_argument("--peer-max", type=int, default=None, help="largest T for mlx-lm's path (a slow loop off-Metal)")
    ap.add_argument("--fast-max", type=int, default=None, help="largest T for mx.fast.gated_delta_update")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=50, help="decode steps per timing chain")
    ap.add_argument("--record", default=None, help="also write the result block (markdown) to this file")
    ap.add_argument("--commit", default=None)
    a = ap.parse_args()
    gpu = kda_ops.gpu_backend()
    on_cpu = gpu is None
    lengths = [int(t) for t in (a.lengths or ("1,512,2048" if on_cpu else "1,512,4096,8192,32768")).split(",")]
    peer_max = a.peer_max or (2048 if on_cpu else 4096)
    fast_max = a.fast_max or (2048 if on_cpu else 8192)
    os.environ[kda_ops.ENV] = "chunked" if on_cpu else "kernel"

    info = mx.device_info()
    card = info.get("device_name", "?")
    lines = []

    def echo(s=""):
        print(s, flush=True)
        lines.append(s)

    echo(f"device: {mx.default_device()} {card} | backend: {gpu or 'cpu'} | mlx {mx.__version__}"
         + (f" | {blas_note()}" if on_cpu else f" | MLX_ENABLE_TF32={os.environ.get('MLX_ENABLE_TF32', '1 (default)')}"))
    echo(f"KDA per layer, H={H} D={D}, batch 1; tokens/s (higher is better); x = speed-up of kimi-mlx")
    echo("mx.fast.gated_delta_update uses a per-head scalar gate (not KDA): speed comparison only")
    echo(f"{'T':>6} | {'kimi-mlx':>14} | {'mlx-lm':>14} | {'mx.fast':>14} | {'x mlx-lm':>8} | {'x mx.fast':>9}")
    for T in lengths:
        if T == 1:
            ours_s, ours_eval = time_decode(decode_ours, step_inputs(), a.steps)
            x = inputs(1)
            both = [time_decode(lambda s: mlx_lm(dict(x, state=s["state"])), x, a.steps),
                    time_decode(lambda s: mx_fast(dict(x, state=s["state"])), x, a.steps)]
            peers = [p[0] for p in both]
            cells = [f"{1e6 * w:.0f}/{1e6 * e:.0f} us" for w, e in [(ours_s, ours_eval), *both]]
        else:
            x = inputs(T)
            ours_s = time_prefill(ours, x, a.repeats)
            peers = [time_prefill(mlx_lm, x, 1) if T <= peer_max else None,
                     time_prefill(mx_fast, x, 1 if T > 4096 else a.repeats) if T <= fast_max else None]
            cells = [f"{T / ours_s:12,.0f}", *(f"{T / p:12,.0f}" if p else f"{'(skipped)':>12}" for p in peers)]
            del x
        ratios = [f"{p / ours_s:.1f}x" if p else "-" for p in peers]
        echo(f"{T:>6} | {cells[0]:>14} | {cells[1]:>14} | {cells[2]:>14} | {ratios[0]:>8} | {ratios[1]:>9}")
    echo("T = 1: microseconds per decode step, wall (incl. building the graph in Python) / eval only;")
    echo("       kimi-mlx's step also does the short conv, norms and gates in the same op")
    if a.record:
        head = f"\n### KDA op, {card} ({gpu or 'cpu'}) — {datetime.date.today()} — commit {a.commit or '?'}\n\n```\n"
        Path(a.record).write_text(head + "\n".join(lines) + "\n```\n")


if __name__ == "__main__":
    main()
