"""Decode with the routed experts streamed from disk (--experts-memory) at several budgets, and resident.

  python benchmarks/offload.py --dir /data/kimi-full-4bit --budgets 2,4,8,16,resident --tokens 16
  python benchmarks/offload.py --dir ... --budgets 4 --cache cold --prefetch off,on

A random checkpoint of --shape (default the full 48B-A3B, ~28 GB at 4 bits) is written to --dir once, a tensor at
a time (kimi_mlx.bench.write_checkpoint), and reused by later runs. Each (budget, prefetch) runs in a fresh
process: load, one prompt token, --warmup decode steps (the pool fills), then --tokens timed decode steps, each
fed a random token id (greedy decoding of random weights soon repeats a token, which routes as before).
Printed per run: decode tok/s, the pool's hit rate, bytes read per token, time waiting on reads per token, and
the process's anonymous memory (RssAnon: what it holds itself, not file pages the OS can drop) at its peak.

Random weights do not route as real text does: on the full-shape random checkpoint the pool's hit rate measured
above the slots / experts a uniform routing would give (RESULTS.md), and real text has its own locality. Treat the
hit rates as this checkpoint's, the bytes and waits per miss as the machine's.

--cache: warm (the shards read once first, so reads come from the page cache, where memory allows), cold (the
shards' pages dropped first with posix_fadvise(DONTNEED): reads come from the disk), or asis (neither).
Runs whose memory would not fit this machine (budget + trunk, or the whole model resident, against
MemAvailable) are skipped and said so.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

ap = argparse.ArgumentParser()
ap.add_argument("--dir", required=True, help="the checkpoint directory (written there first if it holds none)")
ap.add_argument("--shape", default="full", help="random-weight shape: full, small or narrow (kimi_mlx.bench)")
ap.add_argument("--budgets", default="2,4,8,16,resident", help="GB of expert memory, comma-separated; 'resident'")
ap.add_argument("--tokens", type=int, default=16, help="timed decode tokens a run")
ap.add_argument("--warmup", type=int, default=8, help="untimed decode tokens first (the pool fills)")
ap.add_argument("--prefill", type=int, default=0, help="also time a prefill of this many prompt tokens a run")
ap.add_argument("--steps", default="0", help="prefill step sizes to run, comma-separated (0: the automatic plan)")
ap.add_argument("--prefetch", default="off", help="KIMI_MLX_PREFETCH values to run, comma-separated (off,on)")
ap.add_argument("--cache", default="asis", choices=["warm", "cold", "asis"])
ap.add_argument("--record", action="store_true", help="append the lines to benchmarks/RESULTS.md")
ap.add_argument("--card", default="", help="the machine's name in the recorded title (default: the device's)")
ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one run in this process, a JSON line out
a = ap.parse_args()


def anon() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def available() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def one(budget: str) -> dict:
    import mlx.core as mx
    import numpy as np

    from kimi_mlx.bench import activation_dtype, weight_bytes
    from kimi_mlx.weights.load import load_model

    t0 = time.perf_counter()
    model = load_model(a.dir, dtype=activation_dtype(), experts_memory_gb=None if budget == "resident" else float(budget))
    load_s = time.perf_counter() - t0
    stats = model.offload
    out = dict(budget=budget, load_s=load_s, held_gb=weight_bytes(model) / 1e9, anon_load_gb=anon() / 1e9)
    if a.prefill:
        from kimi_mlx.feed import prefill, step_lengths

        state = model.new_state(1)
        step = int(os.environ.get("OFFLOAD_BENCH_STEP", "0"))
        before = stats.snapshot() if stats else None
        toks = [int(t) for t in np.random.default_rng(0).integers(0, model.config.vocab_size, a.prefill)]
        t0 = time.perf_counter()
        prefill(model, state, toks, step)
        out.update(prefill_tok_s=a.prefill / (time.perf_counter() - t0), prefill_anon_gb=anon() / 1e9,
                   prefill_steps=step_lengths(0, a.prefill, step, stats is not None))
        if stats:
            got = stats.since(before)
            out.update(prefill_mb_per_token=got.prefill_bytes / 1e6 / a.prefill, prefill_wait_s=got.prefill_wait_s)
        if not a.tokens:
            return out
    state = model.new_state(1)
    # each step feeds a random token (greedy decoding of random weights soon repeats tokens, and a repeated token
    # routes as before: hits no real text would give); the step's logits and argmax are computed all the same
    feed = np.random.default_rng(1).integers(0, model.config.vocab_size, 1 + a.warmup + a.tokens).tolist()
    y = mx.argmax(model(mx.array([[feed[0]]]), state)[:, -1], axis=-1)
    peak = anon()
    for t in feed[1: 1 + a.warmup]:
        y = mx.argmax(model(mx.array([[t]]), state)[:, -1], axis=-1)
        mx.eval(y)
        peak = max(peak, anon())
    before = stats.snapshot() if stats else None
    t0 = time.perf_counter()
    for t in feed[1 + a.warmup:]:
        y = mx.argmax(model(mx.array([[t]]), state)[:, -1], axis=-1)
        mx.eval(y)
        peak = max(peak, anon())
    dt = time.perf_counter() - t0
    out.update(tok_s=a.tokens / dt, anon_peak_gb=peak / 1e9, mlx_peak_gb=mx.get_peak_memory() / 1e9)
    if stats:
        got = stats.since(before)
        out.update(slots=stats.slots, experts=stats.experts, pool_gb=stats.pool_bytes / 1e9,
                   expert_gb=stats.expert_bytes / 1e9, hit_rate=got.hit_rate, mb_per_token=got.bytes_per_token / 1e6,
                   wait_ms_per_token=1e3 * got.wait_per_token, prefetched=got.prefetched,
                   prefetch_used=got.prefetch_used)
    return out


if a.one:
    print(json.dumps(one(a.one)), flush=True)
    sys.exit(0)

from kimi_mlx import bench  # noqa: E402
from results import Recorder  # noqa: E402

echo = Recorder()
ckpt = Path(a.dir)
if not (ckpt / "config.json").exists():
    if a.shape not in bench.SHAPES:
        sys.exit(f"--shape {a.shape}: choose one of {', '.join(bench.SHAPES)}")
    t0 = time.perf_counter()
    n = bench.write_checkpoint(bench.SHAPES[a.shape], ckpt, 4, 64)
    print(f"wrote {ckpt}: {n / 1e9:.2f} GB of random 4-bit weights in {time.perf_counter() - t0:.0f} s", flush=True)
shards = sorted(ckpt.glob("*.safetensors"))
disk = sum(f.stat().st_size for f in shards)


def set_cache(mode: str) -> None:
    """warm: read every shard once (page cache); cold: drop the shards' cached pages."""
    for f in shards:
        fd = os.open(f, os.O_RDONLY)
        try:
            if mode == "cold":
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            elif mode == "warm":
                while os.read(fd, 1 << 24):
                    pass
        finally:
            os.close(fd)


import mlx.core as mx  # noqa: E402

echo(f"device: {bench.device_line()}; checkpoint {ckpt.name}: {disk / 1e9:.1f} GB on disk ({len(shards)} shards), "
     f"random 4-bit weights (their routing is neither real text's nor uniform: hit rates differ); page cache: "
     f"{a.cache}; "
     f"{a.warmup} warm-up + {a.tokens} timed decode tokens a run")
for budget in a.budgets.split(","):
    budget = budget.strip()
    for prefetch, step in [(p, s) for p in a.prefetch.split(",") for s in a.steps.split(",")]:
        need = disk if budget == "resident" else float(budget) * 1e9 + 0.1 * disk
        if need + 4e9 > available():  # room for the trunk's working set and the machine's other work
            echo(f"{budget + ' GB' if budget != 'resident' else budget:>8} | skipped: needs ~{need / 1e9:.0f} GB of memory, {available() / 1e9:.0f} GB available here")
            break
        if budget == "resident" and prefetch != a.prefetch.split(",")[0]:
            continue
        if a.cache != "asis":
            set_cache(a.cache)
        env = dict(os.environ, KIMI_MLX_PREFETCH=prefetch.strip(), OFFLOAD_BENCH_STEP=step.strip())
        p = subprocess.run([sys.executable, __file__, "--dir", a.dir, "--tokens", str(a.tokens), "--warmup",
                            str(a.warmup), "--prefill", str(a.prefill), "--one", budget], capture_output=True,
                           text=True, env=env)
        if p.returncode != 0:
            echo(f"{budget:>8} GB | failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        if a.prefill:
            steps = r["prefill_steps"]
            label = "resident" if budget == "resident" else f"{budget:>5} GB"
            echo(f"{label} | prefill {a.prefill} tokens in steps of {steps[0]}{' (auto)' if step == '0' else ''}: "
                 f"{r['prefill_tok_s']:.1f} tok/s"
                 + (f" | {1e3 * r['prefill_mb_per_token']:.1f} KB read/prompt token | {r['prefill_wait_s']:.1f} s waiting "
                    "on reads"
                    if "prefill_mb_per_token" in r else "") + f" | RssAnon after {r['prefill_anon_gb']:.2f} GB")
            if not a.tokens:
                continue
        if budget == "resident":
            echo(f"resident | decode {r['tok_s']:6.2f} tok/s | weights held {r['held_gb']:.1f} GB | RssAnon peak "
                 f"{r['anon_peak_gb']:.2f} GB | load {r['load_s']:.0f} s")
            continue
        pf = (f" | prefetch {prefetch}" + (f" ({r['prefetch_used']}/{r['prefetched']} guesses used)"
                                            if r.get("prefetched") else "")) if "," in a.prefetch else ""
        echo(f"{budget:>5} GB | pool {r['slots']}/{r['experts']} a layer ({r['pool_gb']:.2f} of {r['expert_gb']:.1f} GB)"
             f" | decode {r['tok_s']:6.2f} tok/s | hit rate {r['hit_rate']:.2f} | {r['mb_per_token']:.0f} MB read/token | "
             f"{r['wait_ms_per_token']:.0f} ms/token waiting on reads | RssAnon peak {r['anon_peak_gb']:.2f} GB "
             f"(weights held: trunk + pool {r['held_gb']:.2f} GB) | load {r['load_s']:.0f} s{pf}")
if a.record:
    card = a.card or mx.device_info().get("device_name", str(mx.default_device()))
    echo.append(f"Streamed experts (benchmarks/offload.py), {a.shape} shape, page cache {a.cache} — {card}")
