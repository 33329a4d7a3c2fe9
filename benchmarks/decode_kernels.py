"""Where a decoded token's time goes on a GPU: host or device, and which kernels.

  python benchmarks/decode_kernels.py [--shape full] [--context 1024]            # host split of the pipelined loop
  python benchmarks/decode_kernels.py --nap 1,2,4                                # the same with the host asleep
  python benchmarks/decode_kernels.py --batch 8                                  # a batched step of 8 rows
  python benchmarks/decode_kernels.py --batch 8 --experts auto,wide              # expert paths alternating, one process
  ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv --log-file K.csv \
      python benchmarks/decode_kernels.py --profile 2                            # the kernels of 3 tokens (NVIDIA)
  python benchmarks/decode_kernels.py --parse K.csv --tokens 3                   # their sum and the largest
                                                                                 # (a kernel run at several grid
                                                                                 # sizes: each size apart)
  ncu ... python benchmarks/decode_kernels.py --context 0 --prefill 2048 --profile 1   # one prefill step's kernels
  python benchmarks/decode_kernels.py --parse K.csv --tokens 1 [--by-seam]       # (--tokens: steps profiled;
                                                                                 # --by-seam: per half layer)
  python benchmarks/decode_kernels.py --context 0 --prefill 2048 [--steps 4]     # host split of prefill steps

The split times the decode loop bench.time_decode runs (bench.decode_phases: the next token's graph built
and queued while the current one is read): building the graph (our Python and MLX's replay of each compiled
layer), queueing it (MLX encodes every kernel on the calling thread), and waiting for the token. A wait
near zero does not by itself mean the device idles on the host: MLX's eval holds the caller once more than 10
command batches (MLX_MAX_OPS_PER_BUFFER kernels each) are in flight, so the queue phase also holds any wait
for the device. --nap tells them apart: the host sleeps that long after queueing each token; a token that
slows by the whole nap was bound by the host, one that slows by less had that much device time to spare.

The prefill split times a paced prefill step (model/decoder.py `_layers`: each layer queued once the one before
has run): queueing (the decoder's async_eval calls), waiting (its eval calls) and building (the rest: our
Python, MLX's graph building, and any wait inside a layer, such as the long-context attention's). The device
runs only while the host queues or waits, so building is time it may idle.
"""
import argparse
import collections
import csv
import ctypes
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx

from kimi_mlx import bench, settings
from kimi_mlx.settings import SWITCHES

ap = argparse.ArgumentParser()
ap.add_argument("--shape", default="full", choices=list(bench.SHAPES))
ap.add_argument("--context", type=int, default=1024)
ap.add_argument("--tokens", type=int, default=64)
ap.add_argument("--batch", type=int, default=1,
                help="decode steps of this many sequences together (kimi_mlx.batch's engine step: a BatchState, "
                     "Model.decode_rows, one argmax); each 'token' below is then one step of all of them")
ap.add_argument("--profile", type=int, default=0,
                help="decode this many tokens (plus the one queued first) between cuProfilerStart/Stop")
ap.add_argument("--prefill", type=int, default=0,
                help="prefill steps of this many tokens instead of decode tokens: with --profile S, S of them "
                     "marked for ncu; alone, their host split (--steps a window)")
ap.add_argument("--steps", type=int, default=4, help="--prefill without --profile: prefill steps timed a window")
ap.add_argument("--parse", help="an ncu --csv log of --profile: per-token kernel time, the largest kernels")
ap.add_argument("--nap", default="", help="comma-separated milliseconds: also time the decode loop with the host "
                                          "asleep this long a token (see above)")
ap.add_argument("--experts", default="",
                help="comma-separated KIMI_MLX_EXPERTS values (auto, kernel, wide, union, gather): each window times "
                     "each in turn in this process, its steps traced afresh (a host slowed between processes falls "
                     "on all alike)")
ap.add_argument("--by-seam", action="store_true",
                help="with --parse: also the first token's (step's) kernels cut at each norm, by kind")
a = ap.parse_args()
if a.tokens < 1 or a.steps < 1 or a.batch < 1 or a.context < 0 or a.profile < 0 or a.prefill < 0:
    ap.error("--tokens, --steps and --batch take a positive number, --context, --profile and --prefill zero or more")
if a.batch > 1 and (a.prefill or a.nap):
    ap.error("--batch times decode steps: leave out --prefill and --nap")
try:
    naps = [float(x) / 1e3 for x in a.nap.split(",") if x.strip()]
except ValueError:
    ap.error(f"--nap takes comma-separated milliseconds, e.g. 1,2,4 (got {a.nap!r})")
if any(x < 0 for x in naps):
    ap.error("--nap takes milliseconds of zero or more")
experts_paths = [x.strip() for x in a.experts.split(",") if x.strip()]
if experts_paths and (a.prefill or a.profile or naps):
    ap.error("--experts alternates decode windows: leave out --prefill, --profile and --nap")
_choices = SWITCHES["KIMI_MLX_EXPERTS"].choices
if any(x not in _choices for x in experts_paths):
    ap.error(f"--experts takes comma-separated values of {', '.join(_choices)} (got {a.experts!r})")
if a.by_seam and not a.parse:
    ap.error("--by-seam cuts an ncu log's kernels: give --parse LOG too")
if not a.prefill and a.context < 1:
    ap.error("decode needs a --context of at least 1")
if a.profile and not a.parse and not mx.cuda.is_available():
    ap.error("--profile marks the steps for NVIDIA's ncu: it needs MLX's CUDA backend")


SCALE_MS = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "ns": 1e-6, "us": 1e-3, "ms": 1.0}


KINDS = (("qmm", ("qmm", "qmv")), ("matmul", ("gemm", "nvjet", "cutlass", "xmma")), ("gather", ("gather",)),
         ("custom", ("custom_kernel",)))


def kind(kernel: str) -> str:
    """A kernel's kind for the by-seam table: MLX's quantized matmuls, dense matmuls, gathers, our kernels."""
    return next((k for k, keys in KINDS if any(key in kernel for key in keys)), "other")


def by_seam(order, tokens: int):
    """The first token's (step's) kernels in launch order, cut at every norm (the seams between half layers)."""
    parts, cur = [], []
    for k, ms in order:
        if ("rms_norm" in k or "add_norm" in k) and cur:
            parts.append(cur)
            cur = []
        cur.append((k, ms))
    parts.append(cur)
    parts = parts[: max(1, round(len(parts) / tokens))]
    print(f"the first {'token' if tokens == 1 else 'of ' + str(tokens)}'s kernels cut at each norm (half layers):")
    print(f"{'part':>5} {'kernels':>8} {'ms':>8}  " + "  ".join(f"{k:>7}" for k, _ in KINDS) + "    other")
    for i, part in enumerate(parts):
        sums = collections.Counter()
        for k, ms in part:
            sums[kind(k)] += ms
        print(f"{i:5d} {len(part):8d} {sum(ms for _, ms in part):8.3f}  "
              + "  ".join(f"{sums[k]:7.3f}" for k, _ in KINDS) + f"  {sums['other']:7.3f}")


def parse(path: str, tokens: int, seams: bool = False):
    try:
        with open(path) as f:
            rows = [r for r in csv.reader(f) if len(r) > 10]
        head = rows[0]
        name, unit, value = head.index("Kernel Name"), head.index("Metric Unit"), head.index("Metric Value")
        metric, grid = head.index("Metric Name"), head.index("Grid Size")
        rows = [r for r in rows[1:] if r[metric] == "gpu__time_duration.sum"]  # other metrics ncu was asked for
        if not rows:
            raise ValueError("no kernel times")
        short = [r[name].split("(")[0].split("<")[0][:60] for r in rows]
        grids = collections.defaultdict(set)
        for k, r in zip(short, rows):
            grids[k].add(r[grid])
        by = collections.defaultdict(lambda: [0, 0.0])
        order = []
        for k, r in zip(short, rows):
            k += f" grid {r[grid]}" if len(grids[k]) > 1 else ""  # one kernel at several shapes: each apart
            ms = float(r[value].replace(",", "")) * SCALE_MS[r[unit]]
            by[k][0] += 1
            by[k][1] += ms
            order.append((k, ms))
    except OSError as e:
        ap.error(f"--parse {path}: cannot read it ({e.strerror})")
    except (IndexError, ValueError, KeyError):
        ap.error(f"--parse {path}: not an ncu --csv log of gpu__time_duration (run ncu as in this script's docstring)")
    n = sum(c for c, _ in by.values())
    total = sum(t for _, t in by.values())
    print(f"{n / tokens:.0f} kernels a token, {total / tokens:.3f} ms of kernel time a token (serialized by ncu)")
    for k, (c, t) in sorted(by.items(), key=lambda kv: -kv[1][1])[:20]:
        print(f"  {t / tokens:7.3f} ms  {c / tokens:6.1f}x  {k}")
    if seams:
        by_seam(order, tokens)


if a.parse:
    parse(a.parse, a.tokens, a.by_seam)
    sys.exit()

ours, _, cfg = bench.build(a.shape, peer=False, dtype=bench.activation_dtype())
r = bench.Runner("kimi-mlx", ours, True)
r.fill_context(a.context, ours.config) if a.context else r.reset()
print(f"device: {bench.device_line()}; shape {a.shape}; decode at context {a.context}"
      + (f", {a.batch} sequences a step" if a.batch > 1 else ""), flush=True)


batch = None  # the BatchState of --batch rows at --context (made at the first loop)


def loop(n, nap=0.0):
    """bench.time_decode's loop (bench.decode_phases), each phase's seconds a token: (build, queue, wait)."""
    global batch
    step = y = None
    if a.batch > 1:  # bench.time_batch_decode's step: every row's next token in one decode_rows
        if batch is None:
            batch = bench.batch_of(r.state, ours, a.batch)
        step = bench.batch_step(ours, batch)
        y = step(mx.arange(1, a.batch + 1, dtype=mx.uint32))
        mx.async_eval(y)
    y, spent = bench.decode_phases(r, n, y, nap=nap, step=step)
    y.tolist()
    return [x / n for x in spent]


class Timed:
    """Stands in for mlx.core inside a module, timing its eval and async_eval calls (seconds, summed)."""

    def __init__(self):
        self.spent = {"queue": 0.0, "wait": 0.0}

    def __getattr__(self, name):
        return getattr(mx, name)

    def _timed(self, key, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.spent[key] += time.perf_counter() - t0
        return out

    def async_eval(self, *args):
        return self._timed("queue", mx.async_eval, *args)

    def eval(self, *args):
        return self._timed("wait", mx.eval, *args)


def prefill_split(toks, steps: int):
    """Seconds a prefill step: (total, building, queueing, waiting)."""
    from kimi_mlx.model import decoder

    timed = Timed()
    decoder.mx = timed
    try:
        mx.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            r.prefill_step(toks)
        mx.synchronize()
        total = time.perf_counter() - t0
    finally:
        decoder.mx = mx
    q, w = timed.spent["queue"], timed.spent["wait"]
    return [x / steps for x in (total, total - q - w, q, w)]


if a.prefill and not a.profile:
    toks = mx.random.randint(0, ours.config.vocab_size, (1, a.prefill))
    r.prefill_step(toks)  # warm: traces and builds this step's kernels
    print(f"prefill steps of {a.prefill} tokens from context {a.context} (each window {a.steps} steps; the context "
          "grows)")
    print(f"{'tok/s':>8} {'step ms':>8} {'build ms':>9} {'queue ms':>9} {'wait ms':>8}")
    for _ in range(3):
        total, b, q, w = prefill_split(toks, a.steps)
        print(f"{a.prefill / total:8.0f} {total * 1e3:8.1f} {b * 1e3:9.1f} {q * 1e3:9.1f} {w * 1e3:8.1f}", flush=True)
    sys.exit()
if a.prefill:
    toks = mx.random.randint(0, ours.config.vocab_size, (1, a.prefill))
    r.prefill_step(toks)  # warm: builds this step's kernels
    cuda = ctypes.CDLL("libcuda.so.1")
    mx.synchronize()
    cuda.cuProfilerStart()
    for _ in range(a.profile):
        r.prefill_step(toks)
    mx.synchronize()
    cuda.cuProfilerStop()
    sys.exit()
loop(8)  # warm: traces the compiled steps
if a.profile:
    cuda = ctypes.CDLL("libcuda.so.1")
    mx.synchronize()
    cuda.cuProfilerStart()
    loop(a.profile)
    mx.synchronize()
    cuda.cuProfilerStop()
    sys.exit()
if experts_paths:
    print(f"{'tok/s':>8} {'build ms':>9} {'queue ms':>9} {'wait ms':>9}  experts")
    for _ in range(3):
        for path in experts_paths:
            with settings.override(KIMI_MLX_EXPERTS=path):
                ours.retrace()  # the steps traced again, choosing their expert path under the override
                loop(4)
                b, q, w = loop(a.tokens)
            ours.retrace()
            print(f"{a.batch / (b + q + w):8.1f} {b * 1e3:9.3f} {q * 1e3:9.3f} {w * 1e3:9.3f}  {path}", flush=True)
    sys.exit()
print(f"{'tok/s':>8} {'build ms':>9} {'queue ms':>9} {'wait ms':>9}" + (f" {'nap ms':>7}" if naps else ""))
for _ in range(3):
    for nap in [0.0, *naps]:
        b, q, w = loop(a.tokens, nap)
        print(f"{a.batch / (b + q + w):8.1f} {b * 1e3:9.3f} {q * 1e3:9.3f} {w * 1e3:9.3f}"
              + (f" {nap * 1e3:7.1f}" if naps else ""), flush=True)
