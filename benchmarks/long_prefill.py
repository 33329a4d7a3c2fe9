"""A whole long prompt through the model, measured, resumable across processes (one device call is capped
at 10 minutes; a 1M-token prompt at the full shape takes longer).

  python benchmarks/long_prefill.py --shape full --tokens 1048576 --state /root/long.kimi --budget-s 480
  (run again until it prints the totals; --record appends them to benchmarks/RESULTS.md)

Each run builds the same random weights (seeded), prefills one untimed step into a scratch state (its kernels
compile at first use; --no-warmup skips it), loads the saved state if any (its model identity and checksums are
checked), prefills in --step steps until the budget is spent, and saves. The last run decodes
--decode-tokens tokens at the full context and prints: prefill time (the sum of the step times of all runs),
tok/s, the largest peak memory against weights + state (MLA cache and KDA state), and decode tok/s there and at a
1,024-token context.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from kimi_mlx import bench  # noqa: E402
from results import Recorder  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--shape", default="full", choices=list(bench.SHAPES))
ap.add_argument("--tokens", type=int, default=1048576)
ap.add_argument("--step", type=int, default=0, help="prefill step tokens (0: generation's own plan, "
                                                   "kimi_mlx.feed.step_length)")
ap.add_argument("--state", required=True, help="where the state is saved between runs")
ap.add_argument("--budget-s", type=float, default=480)
ap.add_argument("--decode-tokens", type=int, default=16)
ap.add_argument("--record", action="store_true")
ap.add_argument("--each", action="store_true", help="print every step's time and working set")
ap.add_argument("--no-warmup", action="store_true",
                help="skip the untimed first step into a scratch state (it compiles the process's kernels: MLX's "
                     "CUDA backend compiles custom kernels again in every process)")
ap.add_argument("--trace-gb", type=float, default=None,
                help="run steps layer by layer and name the layers of any step holding more than this")
a = ap.parse_args()
if a.step < 0:
    ap.error("--step takes 1 or more tokens, or 0 for generation's own plan")
NEAR = 1024  # the short context the decode at the full one is compared with
echo = Recorder()
model, _, cfg = bench.build(a.shape, peer=False, dtype=bench.activation_dtype())
weights = bench.weight_bytes(model)
room = a.decode_tokens + bench.DECODE_WARMUP  # time_decode's timed and warm-up tokens
n = min(a.tokens, model.config.max_position_embeddings - room)  # the decode must fit in the context limit too
toks = np.random.default_rng(1).integers(0, cfg["vocab_size"], (1, n))
echo(f"device: {bench.device_line()}; shape {a.shape}, random 4-bit weights ({weights / 1e9:.2f} GB); "
     f"prompt {n} tokens in steps of {bench.describe_steps(a.step)}" + (f" (the context limit keeps {room} for the decode)" if n < a.tokens else ""))
if not a.no_warmup:  # kernels compile at their first use: a cost of the process, not of the prompt's length
    first = bench.step_length(0, n, a.step)
    m = bench.measured_step(model, model.new_state(1), mx.array(toks[:, :first]))
    mx.clear_cache()
    echo(f"warm-up step of {first} tokens into a scratch state (not timed below; compiles this process's kernels): "
         f"{m.seconds:.1f} s")
state, prog = bench.resumable_prefill(model, toks, a.state, a.step, a.budget_s, echo, trace_gb=a.trace_gb,
                                 each=a.each)
if prog.done < n:
    echo(f"saved at {prog.done} / {n} tokens: run again to go on")
    sys.exit(0)
# the issue's bound: weights + state (the MLA cache as allocated and the KDA layers' recurrent and conv state) + 2 GB
cache, kda = bench.state_parts(state)
held = cache + kda
echo(f"prefill of {n} tokens: {prog.seconds:.0f} s of steps ({n / prog.seconds:.0f} tok/s); largest peak "
     f"{prog.peak_gb:.2f} GB = weights {weights / 1e9:.2f} + state {held / 1e9:.3f} (MLA cache {cache / 1e9:.3f}, "
     f"KDA {kda / 1e9:.3f}) + {prog.peak_gb - (weights + held) / 1e9:.2f} GB; "
     f"largest working set of one step {prog.step_gb:.2f} GB (the step ending at {prog.step_at})")
r = bench.Runner("kimi-mlx", model, True, state)
far = bench.time_decode(r, a.decode_tokens)
echo(f"decode from {n} to {n + room} tokens of context: {far:.1f} tok/s")
state = r.state = None  # the same decode at a short context, in this process (the target compares the two)
mx.clear_cache()
r.fill_context(NEAR, model.config)
near = bench.time_decode(r, a.decode_tokens)
echo(f"decode from {NEAR} tokens of context: {near:.1f} tok/s; at {n} tokens {far / near:.0%} of that")
if a.record:
    echo.append(f"Whole prefill of {n} tokens, resumable runs")
