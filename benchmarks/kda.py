"""KDA recurrence speed per layer at H32 x D128: this project vs mlx-lm and MLX, in the same run.

  python benchmarks/kda.py                                 # this device, default lengths
  python benchmarks/kda.py --lengths 1,512,4096,8192,32768 --record out.md --commit abc1234

On the GPU machine (../shared/device/README.md), after `bash .device/b/install.sh`:
  export PYTHONPATH=$PWD
  MLX_ENABLE_TF32=0 python3 -m pytest -m "gpu or not gpu" tests/test_kda.py tests/test_kernels_static.py
  python3 -m kimi_mlx doctor && python3 benchmarks/kda.py --record $OUT/kda_gpu.md --commit <sha>
(TF32 off for the 1e-4 tests: MLX's CUDA backend runs float32 matmuls in TF32 by default.)
The prefill variants side by side, with their pieces and fla (fla-core + einops wheels installed there with
`python3 -m pip install --no-deps`: that image's `pip` belongs to another Python):
  python3 benchmarks/kda.py --lengths 1024,8192,32768 --no-peers --parts \
      --scans affine+kernel,doubling+kernel,mma+kernel,affine+mma,doubling+mma,mma+mma

Each path starts from the same raw inputs (q, k, v, gate pre-activation a, beta logit b, A_log,
dt_bias, state) and does its own q/k L2 norms, gates and recurrence:
  kimi-mlx   on a GPU: chunked prefill with the scan across chunks as one kernel, and the fused
             decode kernel, which also does the short conv (KIMI_MLX_KDA=kernel)
  kimi-mlx ops   chunked prefill and the fused decode step in ops only (KIMI_MLX_KDA=chunked;
             the path on CPU)
  mlx-lm     mlx_lm.models.gated_delta.gated_delta_update with KDA's per-channel gate (a Metal
             kernel on Apple GPUs; a per-token loop of ops elsewhere)
  mx.fast    mx.fast.gated_delta_update: a per-HEAD scalar gate only, so it computes a cheaper,
             different recurrence (not KDA); compare its speed only
  fla        fla's Triton `chunk_kda` (the KDA authors' kernels; bf16 q, k, v as it is run, norms, gate and
             beta sigmoid in its kernels), where torch, triton and fla-core import and torch sees a GPU: an
             optional benchmark dependency, never a runtime one
With --scans, the chunked op (KIMI_MLX_KDA=kernel) once per scan across chunks (kda_chunked.SCANS), eager and under
mx.compile (as the model's prefill step runs it). With --parts, the chunked op's pieces timed alone at each T.
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
EPS = 1e-5  # the output norm's epsilon (the model's rms_norm_eps)


def inputs(T, seed=0):
    mx.random.seed(seed)
    r = mx.random.normal
    x = dict(q=r((1, T, H, D)), k=r((1, T, H, D)), v=r((1, T, H, D)), a=r((1, T, H, D)), b=r((1, T, H)),
             a_log=mx.random.uniform(0.0, 2.0, (H,)), dt_bias=r((H * D,)), state=mx.zeros((1, H, D, D)))
    mx.eval(x)
    return x


def kda_call(x):
    """The model's KDA call (dispatcher: KIMI_MLX_KDA picks the path)."""
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


def fla_fn():
    """fla's chunk_kda on the same raw inputs (bf16 q, k, v; state float32), or None where it cannot run."""
    try:
        import numpy as np
        import torch
        from fla.ops.kda import chunk_kda
    except Exception:
        return None
    if not torch.cuda.is_available():
        return None
    cache = {}

    def run(x):
        key = id(x)
        if key not in cache:
            cache.clear()
            t = {n: torch.from_numpy(np.array(x[n].astype(mx.float32))).cuda() for n in x}
            for n in ("q", "k", "v", "a", "b"):  # its inputs as a model layer hands them over, cast before timing
                t[n] = t[n].to(torch.bfloat16)
            cache[key] = t
        t = cache[key]
        with torch.inference_mode():
            return chunk_kda(t["q"], t["k"], t["v"], t["a"], t["b"],
                             initial_state=t["state"].transpose(-1, -2).contiguous(), output_final_state=True,
                             use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                             A_log=t["a_log"], dt_bias=t["dt_bias"])

    def timed(x, repeats):
        run(x)  # warm-up (autotunes and compiles)
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(x)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    return timed


def time_parts(T, repeats, echo):
    """The chunked op's pieces alone at T tokens (one segment's worth at most), from normalised inputs."""
    from kimi_mlx.ops import kda_chunked as KC

    x = inputs(T)
    g = -mx.exp(x["a_log"])[:, None] * kda_ops.softplus(x["a"] + x["dt_bias"].reshape(H, D))
    qn = kda_ops.l2_normalize(x["q"]) * D**-0.5
    kn = kda_ops.l2_normalize(x["k"])
    beta = mx.sigmoid(x["b"])
    n = -(-min(T, KC.SEGMENT) // KC.CHUNK)
    cq, ck, cv, cg = (KC._to_chunks(t[:, :KC.SEGMENT], n) for t in (qn, kn, x["v"], g))
    cb = KC._to_chunks(beta[:, :KC.SEGMENT], n)
    alpha = mx.exp(cg)
    mx.eval(cq, ck, cv, cg, cb, alpha)
    s0 = x["state"]
    gpu = kda_ops.gpu_backend() is not None
    parts = [("intra-chunk kernel", lambda: KC.intra_chunk_kernel(cq, ck, cg, cb)),
             ("intra-chunk mma", lambda: KC.intra_chunk_kernel(cq, ck, cg, cb, "mma"))] if gpu else []
    parts.append(("intra-chunk ops", lambda: KC.intra_chunk(cq, ck, alpha, cb)))
    if hasattr(KC, "intra_chunk_blocked"):
        parts.append(("intra-chunk blocked", lambda: KC.intra_chunk_blocked(cq, ck, alpha, cb)))
    for scan in KC.SCANS if gpu else [s for s in KC.SCANS if s not in ("kernel", "mma")]:
        fn = getattr(KC, f"scan_{scan}")
        parts.append((f"scan {scan}", lambda fn=fn: fn(0.1 * ck, cv, cq, ck, alpha[..., -1, :], s0)))
    for label, fn in parts:
        t = time_prefill(lambda _: fn(), None, repeats)
        echo(f"  T={T:>6} (segment {n * KC.CHUNK}) {label:<22} {1e3 * t:8.3f} ms")


def step_inputs(seed=0):
    mx.random.seed(seed)
    r = mx.random.normal
    C3 = 3 * H * D
    x = dict(qkv=r((1, C3)), gate_a=r((1, H * D)), beta_logit=r((1, H)), conv_tail=r((1, 3, C3)),
             conv_w=0.5 * r((4, C3)), a_log=mx.random.uniform(0.0, 2.0, (H,)), dt_bias=r((H * D,)),
             state=mx.zeros((1, H, D, D)), gate_b=r((1, H * D)), norm_w=mx.ones((D,)))
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


STEP_ARGS = ("qkv", "gate_a", "beta_logit", "conv_tail", "conv_w", "a_log", "dt_bias", "state", "gate_b", "norm_w")


def decode_kernel(x):
    return decode_step_kernel(**{k: x[k] for k in STEP_ARGS}, eps=EPS)


def decode_ops(x):
    return decode_step_ops(**{k: x[k] for k in STEP_ARGS}, eps=EPS)


def with_mode(fn, mode):
    def run(x):
        os.environ[kda_ops.ENV] = mode
        return fn(x)
    return run


def rel_err(a, b) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.abs(a - b).max() / mx.maximum(mx.abs(b).max(), 1e-30)).item()


def with_scan(fn, scan, intra="kernel"):
    def run(x):
        os.environ[kda_ops.ENV] = "kernel"
        os.environ[kda_ops.SCAN_ENV] = scan
        os.environ[kda_ops.INTRA_ENV] = intra
        try:
            return fn(x)
        finally:
            del os.environ[kda_ops.SCAN_ENV], os.environ[kda_ops.INTRA_ENV]
    return run


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
    ap.add_argument("--scans", default=None, help="comma list of SCAN[+INTRA] (kda_chunked.SCANS, INTRAS): a column "
                    "each on the kernel path, eager and compiled")
    ap.add_argument("--parts", action="store_true", help="also time the chunked op's pieces alone at each T")
    ap.add_argument("--no-peers", action="store_true", help="skip mlx-lm and mx.fast")
    a = ap.parse_args()
    gpu = kda_ops.gpu_backend()
    on_cpu = gpu is None
    lengths = [int(t) for t in (a.lengths or ("1,512,2048" if on_cpu else "1,512,4096,8192,32768")).split(",")]
    peer_max = a.peer_max or (2048 if on_cpu else 4096)
    fast_max = a.fast_max or (2048 if on_cpu else 8192)

    info = mx.device_info()
    card = info.get("device_name", "?")
    lines = []

    def echo(s=""):
        print(s, flush=True)
        lines.append(s)

    echo(f"device: {mx.default_device()} {card} | backend: {gpu or 'cpu'} | mlx {mx.__version__}"
         + (f" | {blas_note()}" if on_cpu else f" | MLX_ENABLE_TF32={os.environ.get('MLX_ENABLE_TF32', '1 (default)')}"))
    echo(f"KDA per layer, H={H} D={D}, batch 1; tokens/s (higher is better); x = speed-up of the first column")
    echo("mx.fast.gated_delta_update uses a per-head scalar gate (not KDA): speed comparison only")
    # (label, prefill fn, decode fn, max T or None); the first column is what `auto` picks here
    mine = [("kimi-mlx", with_mode(kda_call, "kernel"), decode_kernel, None)] if gpu else []
    if gpu and a.scans:
        for variant in a.scans.split(","):  # scan[+intra]; a compiled function each: mx.compile keys graphs on shapes
            scan, _, intra = variant.partition("+")
            intra = intra or "kernel"
            mine.append((variant, with_scan(kda_call, scan, intra), decode_kernel, None))
            mine.append((f"{variant} comp.", with_scan(mx.compile(kda_call), scan, intra), decode_kernel, None))
    mine.append(("kimi-mlx ops", with_mode(kda_call, "chunked"), decode_ops, None))
    peers = [] if a.no_peers else [("mlx-lm", mlx_lm, None, peer_max), ("mx.fast", mx_fast, None, fast_max)]
    fla = fla_fn() if gpu == "cuda" else None
    if fla is not None:
        peers.append(("fla", fla, None, None))
    cols = mine + peers
    echo(f"{'T':>6} | " + " | ".join(f"{c[0]:>14}" for c in cols) + " | " + " | ".join(f"{'x ' + p[0]:>10}" for p in peers))
    for T in lengths:
        times, cells, agree = [], [], []
        x = inputs(T)
        first = None  # the first column's prefill result: each variant of ours is compared with it
        for label, prefill, decode, max_t in cols:
            if T == 1 and label == "fla":
                times.append(None)
                cells.append("(n/a)")
            elif T == 1:
                if decode is None:
                    wall, ev = time_decode(lambda s, f=prefill: f(dict(x, state=s["state"])), x, a.steps)
                else:
                    wall, ev = time_decode(decode, step_inputs(), a.steps)
                times.append(wall)
                cells.append(f"{1e6 * wall:.0f}/{1e6 * ev:.0f} us")
            elif label == "fla":
                try:
                    times.append(prefill(x, a.repeats))
                    cells.append(f"{T / times[-1]:,.0f}")
                except Exception as e:  # an optional peer: report it, keep the run
                    echo(f"fla chunk_kda failed at T={T}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                    times.append(None)
                    cells.append("(failed)")
            elif max_t is not None and T > max_t:
                times.append(None)
                cells.append("(skipped)")
            else:
                repeats = a.repeats if max_t is None else (1 if T > 4096 else a.repeats)
                times.append(time_prefill(prefill, x, repeats))
                cells.append(f"{T / times[-1]:,.0f}")
                if a.scans and any(label == m[0] for m in mine):
                    o, s = prefill(x)
                    if first is None:
                        first = (o, s)
                    else:
                        agree.append(f"{label} {max(rel_err(o, first[0]), rel_err(s, first[1])):.1e}")
        del x
        ratios = [f"{p / times[0]:.2f}x" if p else "-" for p in times[len(mine):]]
        echo(f"{T:>6} | " + " | ".join(f"{c:>14}" for c in cells) + " | " + " | ".join(f"{r:>10}" for r in ratios))
        if agree:
            echo(f"  T={T:>6} max error relative to the largest magnitude, against {cols[0][0]}: " + ", ".join(agree))
        if a.parts and T > 1:
            time_parts(T, a.repeats, echo)
    echo("T = 1: microseconds per decode step, wall (incl. building the graph in Python) / eval only;")
    echo("       kimi-mlx's step also does the short conv, norms and gates in the same op")
    if a.record:
        head = f"\n### KDA op, {card} ({gpu or 'cpu'}) — {datetime.date.today()} — commit {a.commit or '?'}\n\n```\n"
        Path(a.record).write_text(head + "\n".join(lines) + "\n```\n")


if __name__ == "__main__":
    main()
