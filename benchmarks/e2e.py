"""End-to-end prefill/decode benchmark against mlx-lm on the same random weights (see kimi_mlx/bench.py).

  python benchmarks/e2e.py --shape full --contexts 1024,32768,131072 --prefill 1024,8192,32768 --record
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kimi_mlx import bench  # noqa: E402
from results import Recorder  # noqa: E402


def ints(s):
    return tuple(int(x) for x in s.split(",") if x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="small", choices=list(bench.SHAPES))
    ap.add_argument("--contexts", type=ints, default=(1024,))
    ap.add_argument("--prefill", type=ints, default=(1024,))
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--step", type=int, default=0, help="prefill step tokens for both models (0: each its own "
                                                          "default: ours feed.step_length, mlx-lm 2048)")
    ap.add_argument("--bits", type=int, default=4, help="0 = unquantized")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--peer-prefill-max", type=int, default=2048)
    ap.add_argument("--step-at", type=ints, default=(), help="time the prefill step ending at these contexts")
    ap.add_argument("--bandwidth", type=float, default=None, help="device bandwidth in GB/s, for the fraction")
    ap.add_argument("--rounds", type=int, default=1, choices=range(1, 101), metavar="1..100",
                    help="decode each context this many times per runner, alternating them (medians reported)")
    ap.add_argument("--record", action="store_true", help="append to benchmarks/RESULTS.md")
    a = ap.parse_args()
    if a.step < 0:
        ap.error("--step takes 1 or more tokens, or 0 for each model's own default")
    echo = Recorder()
    bench.run(a.shape, a.contexts, a.prefill, a.decode_tokens, a.step, a.bits, peer=not a.no_peer,
              peer_prefill_max=a.peer_prefill_max, bandwidth_gbs=a.bandwidth, step_at=a.step_at, echo=echo,
              rounds=a.rounds)
    if a.record:
        echo.append(f"e2e {a.shape}")


if __name__ == "__main__":
    main()
