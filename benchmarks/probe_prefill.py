import sys, time
sys.path.insert(0, ".")
import mlx.core as mx
from kimi_mlx import bench
ours, _, cfg = bench.build("full", peer=False)
L = ours.model.layers
T = 2048
h = mx.random.normal((1, T, 2304)).astype(mx.bfloat16)
def timeit(name, fn, n=3):
    mx.eval(fn())
    t0 = time.perf_counter()
    for _ in range(n): mx.eval(fn())
    print(f"{name:44s} {(time.perf_counter() - t0) / n * 1e3:9.2f} ms", flush=True)
kda_i = [i for i in range(len(L)) if L[i].is_kda][1]
mla_i = [i for i in range(len(L)) if not L[i].is_kda][0]
st = ours.new_state()
timeit("KDA attention, 1 layer, T=2048", lambda: L[kda_i].self_attn(h, st.layers[kda_i].__class__(st.layers[kda_i].conv, st.layers[kda_i].recurrent)))
timeit("MoE, 1 layer, T=2048", lambda: L[kda_i].mlp(h))
timeit("dense MLP layer 0, T=2048", lambda: L[0].mlp(h))
def mla_fresh():
    s = ours.new_state().layers[mla_i]
    return L[mla_i].self_attn(h, s)
timeit("MLA attention, 1 layer, S=T=2048 (fresh)", mla_fresh)
timeit("lm_head T=2048", lambda: ours.logits(h))
timeit("whole model 2048 from empty", lambda: ours(mx.zeros((1, T), mx.int32), ours.new_state()))
