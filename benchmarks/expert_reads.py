"""Whether a checkpoint should store each routed expert's bytes contiguously: reading experts as the streamed
experts do (model/offload.py: each expert's 9 runs, weight, scales and biases of gate, up and down, each from its
own bank tensor) against one run of the same bytes per expert (a per-expert layout), from one file, through a
pool of reader threads as offload's.

  python benchmarks/expert_reads.py                          # 128 experts of the full shape, warm and cold
  python benchmarks/expert_reads.py --experts 16 --reads 8   # a quick run

The file (--dir, default a temporary directory) holds both layouts of --experts experts of the full shape's
sizes (4-bit gs64: gate and up [1024, 2304], down [2304, 1024]; ~4 MB an expert). Each round reads --reads
random experts (the same for both layouts), each expert's runs submitted to the pool at once and awaited, as a
decode step's misses are. warm: the file read once first (reads from the page cache); cold: its pages dropped
before every round (posix_fadvise DONTNEED: reads from the disk). Printed: ms an expert and GB/s, each layout.
"""
import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kimi_mlx.model.offload import READ_THREADS  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--experts", type=int, default=128)
ap.add_argument("--reads", type=int, default=32, help="experts read a round")
ap.add_argument("--rounds", type=int, default=5)
ap.add_argument("--dir", default=None)
a = ap.parse_args()
if a.experts < 1 or a.reads < 1 or a.rounds < 1 or a.reads > a.experts:
    ap.error("--experts, --reads and --rounds take positive numbers, --reads at most --experts")

D, I, GS = 2304, 1024, 64
# (rows, cols) of each run's array: weight uint32 words (8 4-bit values), scales and biases bf16 a group
RUNS = []
for rows, cols in ((I, D), (I, D), (D, I)):
    RUNS += [rows * cols // 2, rows * cols // GS * 2, rows * cols // GS * 2]  # bytes: weight, scales, biases
EXPERT = sum(RUNS)


def write(path: Path) -> tuple[list[list[tuple[int, int]]], list[tuple[int, int]]]:
    """Both layouts in one file: 9 banks (run k of expert e at bank k's start + e * its size), then the experts
    one after another. Returns each expert's (offset, size) runs in the banks and its one run."""
    rng = np.random.default_rng(0)
    banks, offset = [], 0
    with open(path, "wb") as f:
        for size in RUNS:
            banks.append(offset)
            for _ in range(a.experts):
                f.write(rng.integers(0, 255, size, dtype=np.uint8).tobytes())
            offset += size * a.experts
        packed = offset
        for e in range(a.experts):
            f.write(rng.integers(0, 255, EXPERT, dtype=np.uint8).tobytes())
    split = [[(banks[k] + e * size, size) for k, size in enumerate(RUNS)] for e in range(a.experts)]
    whole = [[(packed + e * EXPERT, EXPERT)] for e in range(a.experts)]
    return split, whole


def read_round(fd: int, pool, runs_of, picks) -> float:
    bufs = [bytearray(EXPERT) for _ in picks]
    t0 = time.perf_counter()
    futures = []
    for buf, e in zip(bufs, picks):
        view, at = memoryview(buf), 0
        for offset, size in runs_of[e]:
            futures.append(pool.submit(os.preadv, fd, [view[at : at + size]], offset))
            at += size
    wait(futures)
    for f in futures:
        f.result()
    return time.perf_counter() - t0


def main():
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        path = Path(tmp) / "experts.bin"
        split, whole = write(path)
        fd = os.open(path, os.O_RDONLY)
        rng = np.random.default_rng(1)
        print(f"{a.experts} experts of {EXPERT / 1e6:.2f} MB (9 runs: {', '.join(f'{s / 1e3:.0f}' for s in RUNS)} KB) "
              f"in {path.stat().st_size / 1e9:.2f} GB; {a.reads} experts a round, {a.rounds} rounds; "
              f"{READ_THREADS} reader threads")
        with ThreadPoolExecutor(READ_THREADS) as pool:
            for cache in ("warm", "cold"):
                got = {"9 runs (banks)": [], "1 run (per expert)": []}
                for r in range(a.rounds):
                    picks = [int(x) for x in rng.choice(a.experts, a.reads, replace=False)]
                    ways = list(got.items()) if r % 2 == 0 else list(got.items())[::-1]
                    for name, times in ways:
                        if cache == "cold":
                            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                        else:
                            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
                            read_round(fd, pool, split if name.startswith("9") else whole, picks)  # warm them
                        times.append(read_round(fd, pool, split if name.startswith("9") else whole, picks))
                for name, times in got.items():
                    t = float(np.median(times))
                    print(f"{cache}: {name:>20}: {1e3 * t / a.reads:7.2f} ms an expert, "
                          f"{a.reads * EXPERT / t / 1e9:6.2f} GB/s (median of {a.rounds})", flush=True)
        os.close(fd)


main()
