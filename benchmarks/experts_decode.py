"""The MoE decode op alone: N tokens' (token, expert) pairs through one layer's gate|up and down banks, by each path
ops/experts.py offers, against MLX's own gather matmuls (the `gather` path, mlx-lm's SwitchGLU op), at the full
shape (D 2,304, I 1,024, 256 routed + 1 shared expert, 8 + 1 pairs a token, 4-bit affine gs64).

  python benchmarks/experts_decode.py                       # tokens 1,8,9,16 on this device's paths
  python benchmarks/experts_decode.py --tokens 8 --scale 8  # sizes divided by 8 (a quick CPU run)

Each call routes its tokens to fresh random experts, uniformly among all 256 or among a --pool drawn for the call (a
list of routings made ahead, cycled), so a call reads its experts from memory, not from the L2 cache the previous
call filled; --calls calls are queued together and evaluated once. Reported: microseconds a call, and the rate at
which the call's distinct experts' bytes (weights, scales, biases of both banks) were read. Paths: kernel
(moe_gate_up + moe_down, the default on a GPU), wide (the 16-byte-load pair; --wide-units R[/RD],... a column for
each of its groups' widths), union (gate|up read once per distinct expert), gather (MLX's gather_qmm; on the CPU the
only one).
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from kimi_mlx import doctor  # noqa: E402
from kimi_mlx.ops import experts  # noqa: E402
from kimi_mlx.ops.kda import gpu_backend  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--tokens", default="1,8,9,16", help="comma-separated token counts N (9: a verification of 8 drafts)")
ap.add_argument("--scale", type=int, default=1, help="divide D and I by this (quick runs)")
ap.add_argument("--calls", type=int, default=50)
ap.add_argument("--routings", type=int, default=64, help="distinct random routings cycled through")
ap.add_argument("--pool", type=int, default=256,
                help="each call's tokens route among this many experts, drawn afresh a call (256: uniform routing, "
                     "random weights' case; fewer: tokens that share experts, as n samples of one prompt or a "
                     "verification's neighbouring tokens do, where union reads each shared expert once)")
ap.add_argument("--paths", default=None, help="comma-separated paths (default: every one this device runs)")
ap.add_argument("--wide-units", default=None,
                help="comma-separated R or R/RD: hidden units a lane group of moe_gate_up_wide (experts.WIDE_UNITS) "
                     "and output rows a threadgroup of moe_down_wide (WIDE_DOWN_UNITS): a column 'wide R/RD' each "
                     "(default: the module's values)")
a = ap.parse_args()
try:
    tokens = [int(t) for t in a.tokens.split(",")]
except ValueError:
    ap.error(f"--tokens takes comma-separated integers, got {a.tokens!r}")
if a.scale < 1 or a.calls < 1 or a.routings < 1 or any(t < 1 for t in tokens):
    ap.error("--tokens, --scale, --calls and --routings take positive numbers")
if not 8 <= a.pool <= 256:
    ap.error("--pool takes 8 to 256 experts (a token routes to 8 distinct ones)")

E, K = 257, 9  # 256 routed + the shared expert (the last), 8 routed + 1 shared a token
D, I = max(128, 2304 // a.scale // 128 * 128), max(128, 1024 // a.scale // 128 * 128)
gpu = gpu_backend() is not None
dtype = mx.bfloat16 if gpu else mx.float32
paths = a.paths.split(",") if a.paths else (["kernel", "wide", "union", "gather"] if gpu else ["gather"])
if a.wide_units:
    try:
        widths = [[int(v) for v in r.split("/")] for r in a.wide_units.split(",")]
    except ValueError:
        ap.error(f"--wide-units takes comma-separated R or R/RD, e.g. 1,2/8 (got {a.wide_units!r})")
    if any(len(w) > 2 or min(w) < 1 or max(w) > 32 for w in widths):
        ap.error(f"--wide-units takes widths of 1 to 32, R or R/RD (got {a.wide_units!r})")
    if "wide" in paths:  # wide -> a column for each width
        at = paths.index("wide")
        paths[at : at + 1] = ["wide " + "/".join(map(str, w)) for w in widths]
if not gpu and set(paths) - {"gather"}:
    ap.error("the kernel paths need a Metal or CUDA device; on the CPU: --paths gather")

mx.random.seed(0)
gate_up, down = doctor.random_banks(E, D, I, 4, 64, dtype, 4)
mx.eval(gate_up.parameters(), down.parameters())
per_expert = sum(v.nbytes for v in gate_up.parameters().values()) / E + sum(
    v.nbytes for v in down.parameters().values()) / E


def routings(N: int) -> list[tuple[mx.array, mx.array, float]]:
    """(idx [N, K] int32, weights [N, K], distinct experts' bytes) per routing: 8 distinct random routed experts a
    token among a --pool of experts drawn for the call, the shared expert last."""
    rng = np.random.default_rng(N)
    out = []
    for _ in range(a.routings):
        pool = rng.choice(E - 1, a.pool, replace=False)
        routed = np.stack([pool[rng.choice(a.pool, K - 1, replace=False)] for _ in range(N)])
        idx = np.concatenate([routed, np.full((N, 1), E - 1)], axis=1).astype(np.int32)
        w = rng.uniform(0.01, 1.0, (N, K)).astype(np.float32)
        out.append((mx.array(idx), mx.array(w), len(np.unique(idx)) * per_expert))
    return out


DOWN_UNITS = experts.WIDE_DOWN_UNITS


def run(path: str, x, idx, w):
    if path == "gather":
        return experts.experts_ref(x, idx, w, gate_up, down)
    if path.startswith("wide "):  # (the launches' templates take R and RD: kernels built for each)
        widths = [int(v) for v in path.split()[1].split("/")]
        experts.WIDE_UNITS = widths[0]
        experts.WIDE_DOWN_UNITS = widths[1] if len(widths) > 1 else DOWN_UNITS
        path = "wide"
    return experts.experts_kernel(x, idx, w, gate_up, down, union=path == "union", wide=path == "wide")


info = mx.device_info()
print(f"{mx.default_device()} {info.get('device_name') or info.get('architecture', '?')}, MLX {mx.__version__}; "
      f"D {D}, I {I}, {E} experts, {K} pairs a token (routed among {a.pool} a call), 4-bit gs64, "
      f"{str(dtype).split('.')[-1]}; us a call (GB/s of the call's distinct experts)")
print("| tokens | " + " | ".join(paths) + " |")
print("|---|" + "---|" * len(paths))
for N in tokens:
    rs = routings(N)
    x = mx.random.normal((N, D)).astype(dtype)
    mx.eval(x, *[r[:2] for r in rs])
    cells = []
    for path in paths:
        mx.eval(run(path, x, *rs[0][:2]))  # built and warm
        mx.synchronize()
        calls = [rs[i % len(rs)] for i in range(a.calls)]
        t0 = time.perf_counter()
        mx.eval([run(path, x, idx, w) for idx, w, _ in calls])
        mx.synchronize()
        dt = (time.perf_counter() - t0) / a.calls
        read = sum(c[2] for c in calls) / a.calls
        cells.append(f"{dt * 1e6:.1f} ({read / dt / 1e9:.0f})")
    print(f"| {N} | " + " | ".join(cells) + " |", flush=True)
