"""Where a 2,048-token prefill step goes at the full shape, per component (GPU profile probe).

  python benchmarks/probe_prefill.py
"""
import os
import sys
import time

sys.path.insert(0, ".")
import mlx.core as mx  # noqa: E402

from kimi_mlx import bench  # noqa: E402
from kimi_mlx.state import KDAState  # noqa: E402

ours, _, cfg = bench.build("full", peer=False)
L = ours.model.layers
T = 2048
h = mx.random.normal((1, T, 2304)).astype(mx.bfloat16)


def timeit(name, fn, n=2):
    mx.eval(fn())
    t0 = time.perf_counter()
    for _ in range(n):
        mx.eval(fn())
    print(f"{name:48s} {(time.perf_counter() - t0) / n * 1e3:9.2f} ms", flush=True)


kda_i = [i for i in range(len(L)) if L[i].is_kda][1]
mla_i = [i for i in range(len(L)) if not L[i].is_kda][0]
st = ours.new_state()
ks = st.layers[kda_i]
timeit("KDA attention, 1 layer", lambda: L[kda_i].self_attn(h, KDAState(ks.conv, ks.recurrent)))
for path in ("sorted", "segmented"):
    os.environ["KIMI_MLX_EXPERTS"] = path
    timeit(f"MoE, 1 layer, experts path {path}", lambda: L[kda_i].mlp(h))
os.environ.pop("KIMI_MLX_EXPERTS")
timeit("dense MLP, layer 0", lambda: L[0].mlp(h))
for S in (0, 30720):
    def mla():
        r = bench.Runner("o", ours, True)
        r.reset()
        if S:
            r.state.layers[mla_i].append(mx.zeros((1, S, 576), mx.bfloat16))
        return L[mla_i].self_attn(h, r.state.layers[mla_i])
    timeit(f"MLA attention, 1 layer, cache {S} + {T}", mla)
timeit("lm_head", lambda: ours.logits(h))
timeit("whole model, one step from empty", lambda: ours(mx.zeros((1, T), mx.int32), ours.new_state()))
