"""End-to-end speed: prefill and decode tok/s, peak memory and bandwidth, against mlx-lm on the same weights.

Random weights at the real Kimi-Linear-48B-A3B shape (or a small one), built layer by layer in the HF
layout and fed through both projects' own loading code, then quantized the same way.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .config import KIMI_LINEAR_48B_A3B, ModelConfig
from .feed import PREFILL_STEP, STREAMED_STEP, describe_steps, prefill_step, step_length, step_lengths
from .model import Model
from .model.decoder import prefill_memory
from .model.fuse import fuse_model
from .weights.layout import hf_layer_to_local
from .weights.load import check_kernels

FULL = KIMI_LINEAR_48B_A3B
SMALL = {**FULL, "vocab_size": 4096, "hidden_size": 512, "num_hidden_layers": 4, "intermediate_size": 1024,
         "num_attention_heads": 8, "num_key_value_heads": 8, "kv_lora_rank": 128, "qk_nope_head_dim": 64,
         "qk_rope_head_dim": 32, "v_head_dim": 64, "num_experts": 16, "num_experts_per_token": 4,
         "moe_intermediate_size": 256,
         "linear_attn_config": {"kda_layers": [1, 2, 3], "full_attn_layers": [4], "num_heads": 8, "head_dim": 64,
                                "short_conv_kernel_size": 4}}
# the full shape's 27 layers, heads, head dims and 256 experts around a narrow residual stream and FFNs: the
# same graph and kernels per token with little arithmetic, so its decode rate is the device's dispatch floor
NARROW = {**FULL, "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 64}
SHAPES = {"full": FULL, "small": SMALL, "narrow": NARROW}


def hf_layer(cfg: dict, i: int, rng: np.random.Generator, dtype) -> dict[str, mx.array]:
    """Random tensors of one layer in the HF (Moonshot) layout."""
    from .demo import layer_tensors

    def normal(shape, std):
        return (std * mx.random.normal(shape)).astype(dtype)

    t = layer_tensors(cfg, i, rng, normal)
    return {k: mx.array(v).astype(dtype if k.endswith("norm.weight") else mx.float32) if isinstance(v, np.ndarray)
            else v for k, v in t.items()}


def recipe_predicate(cfg: ModelConfig, bits: int, group_size: int):
    """prefix -> nn.quantize's class_predicate for the modules under `prefix`, quantizing them as `kimi-mlx convert
    --bits B --group-size G` does (the converter's default recipe: the KDA gate and beta projections at 8 bits, the
    router kept float)."""
    from .weights.convert import quant_plan
    from .weights.recipes import make_recipe

    plan, _ = quant_plan(cfg, make_recipe(bits, group_size, "affine", None))

    def under(prefix: str):
        def pred(path, m):
            spec = plan.get(prefix + path)
            return spec.to_dict() if spec is not None else False
        return pred
    return under


def activation_dtype() -> mx.Dtype:
    """What random-weight benchmarks compute in: bf16 on a GPU, float32 on the CPU (its bf16 is slow)."""
    return mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32


def build(shape: str, bits: int = 4, group_size: int = 64, dtype=mx.bfloat16, peer: bool = True, seed: int = 0):
    """(our model, mlx-lm model or None, config dict) with identical random weights."""
    cfg_d = SHAPES[shape]
    cfg = ModelConfig.from_dict(cfg_d)
    rng = np.random.default_rng(seed)
    mx.random.seed(seed)  # the same weights in every process (resumable runs check the model's identity)
    ours = Model(cfg)
    theirs = None
    if peer:
        from mlx_lm.models.kimi_linear import Model as PeerModel
        from mlx_lm.models.kimi_linear import ModelArgs

        theirs = PeerModel(ModelArgs.from_dict(cfg_d))
    quantized = recipe_predicate(cfg, bits, group_size) if bits else None
    for i in range(cfg.num_hidden_layers):
        hf = hf_layer(cfg_d, i, rng, dtype)
        if theirs is not None:
            w = theirs.sanitize(dict(hf))
            theirs.load_weights(list(w.items()), strict=False)
            bits and nn.quantize(theirs.model.layers[i], group_size, bits,
                        class_predicate=lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % group_size == 0
                        and ({"group_size": 64, "bits": 8} if p.endswith("mlp.gate") else True))
            mx.eval(theirs.model.layers[i].parameters())
        ours.load_weights(list(hf_layer_to_local(cfg, i, dict(hf)).items()), strict=False)
        bits and nn.quantize(ours.model.layers[i], class_predicate=quantized(f"model.layers.{i}."))
        mx.eval(ours.model.layers[i].parameters())
        del hf
        gc.collect()
    top = {"model.embed_tokens.weight": mx.random.normal((cfg.vocab_size, cfg.hidden_size)).astype(dtype),
           "model.norm.weight": mx.ones((cfg.hidden_size,), dtype),
           "lm_head.weight": (0.02 * mx.random.normal((cfg.vocab_size, cfg.hidden_size))).astype(dtype)}
    for m in filter(None, (ours, theirs)):
        m.load_weights(list(top.items()), strict=False)
    if bits:
        nn.quantize(ours, class_predicate=lambda p, mod: p in ("model.embed_tokens", "lm_head") and quantized("")(p, mod))
        if theirs is not None:
            nn.quantize(theirs, group_size, bits, class_predicate=lambda p, mod: p in ("model.embed_tokens", "lm_head"))
    for m in filter(None, (ours, theirs)):
        mx.eval(m.parameters())
    fuse_model(ours)
    ours.eval()
    check_kernels(ours)  # as loading does: a decode kernel the GPU refuses stays off
    return ours, theirs, cfg_d


def _offloaded(model: nn.Module) -> list:
    from .model.offload import OffloadedMoE

    layers = getattr(getattr(model, "model", None), "layers", [])
    return [layer.mlp for layer in layers if isinstance(getattr(layer, "mlp", None), OffloadedMoE)]


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights held: parameters, and the expert pools of streamed MoE layers."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters())) + sum(m.held_bytes() for m in _offloaded(model))


# an attention parameter decode does not read where model/fuse.py derived the one it reads instead (where the KDA
# decode kernel applies f_b and g_b itself, ops/kda_decode.py, it reads those and not gates_out: ~1% fewer bytes
# than counted at the real shape)
DECODE_READS_INSTEAD = {"k_up": "q_absorb", "v_up": "v_absorb", "f_b_proj": "gates_out.weight",
                        "g_b_proj": "gates_out.weight", "q_proj": "q_kv.weight", "kv_a_proj_with_mqa": "q_kv.weight"}


def active_bytes_per_token(model: Model) -> int:
    """Bytes of weights read per decoded token: all but the unused experts and the embedding table."""
    cfg = model.config
    E, k, S = cfg.num_experts, cfg.num_experts_per_token, cfg.num_shared_experts
    total = 0
    params = tree_flatten(model.parameters())
    names = {name for name, _ in params}
    for name, v in params:
        layer, _, rest = name.partition(".self_attn.")
        derived = DECODE_READS_INSTEAD.get(rest.split(".")[0])
        if derived and f"{layer}.self_attn.{derived}" in names:
            continue
        if "embed_tokens" in name:
            total += v.nbytes // v.shape[0]
        elif ".mlp." in name and v.ndim == 3 and v.shape[0] in (E, E + S):  # an expert bank
            total += v.nbytes * (k + (v.shape[0] - E)) // v.shape[0]
        else:
            total += v.nbytes
    return total + sum(m.active_bytes() for m in _offloaded(model))  # streamed layers: top_k + shared experts


def cache_bytes_per_token(cfg: ModelConfig, itemsize: int = 2) -> int:
    return cfg.layer_types.count("mla") * cfg.latent_dim * itemsize


@dataclass
class Runner:
    """Uniform prefill/decode driving for our model and mlx-lm's."""
    name: str
    model: nn.Module
    is_ours: bool
    state: object = field(default=None)
    host_ms: tuple = ()  # the last time_decode's ms a token building, queueing and waiting (decode_phases)

    def reset(self):
        self.state = self.model.new_state(1) if self.is_ours else self.model.make_cache()

    def forward(self, toks: mx.array) -> mx.array:
        if self.is_ours:
            return self.model(toks, self.state)
        return self.model(toks, cache=self.state)

    def prefill_step(self, toks: mx.array):
        """One prefill step, evaluated (ours through feed.prefill_step, the way generation runs it)."""
        if self.is_ours:
            return prefill_step(self.model, self.state, toks)
        self.forward(toks)
        self.eval_state()

    def eval_state(self):
        if self.is_ours:
            self.state.eval()
        else:
            mx.eval([c.state for c in self.state])

    def fill_context(self, n: int, cfg: ModelConfig):
        """Give every MLA layer a cache of n random latent rows (decode cost depends on length only), in the
        dtype the model's own prefill writes them: its activations' (float32 models on a CPU keep a float32
        cache; rows of another dtype would make every decode matmul over the cache convert it first)."""
        self.reset()
        L, pe = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        dtype = self.row_dtype()
        if self.is_ours:
            for s in self.state.layers:
                if hasattr(s, "append"):
                    s.append(mx.random.normal((1, n, L + pe)).astype(dtype))
            self.state.offset = n
        else:
            from mlx_lm.models.cache import KVCache

            for c in self.state:
                if isinstance(c, KVCache):
                    c.update_and_fetch(mx.random.normal((1, 1, n, L)).astype(dtype),
                                       mx.random.normal((1, 1, n, pe)).astype(dtype))
        self.eval_state()

    def row_dtype(self) -> mx.Dtype:
        """The dtype of the model's activations: its token embedding's output."""
        return self.model.model.embed_tokens(mx.array([[0]])).dtype


def steps_of(r: Runner, n: int, step: int) -> list[int]:
    """The prefill step lengths r takes for an n-token prompt: ours generation's own plan (feed.step_lengths;
    step 0 = auto), mlx-lm's `step` or its default prefill_step_size (2,048)."""
    if r.is_ours:
        return step_lengths(0, n, step, getattr(r.model, "offload", None) is not None)
    return step_lengths(0, n, step or PREFILL_STEP)


def time_prefill(r: Runner, n: int, step: int, vocab: int) -> float:
    toks = mx.random.randint(0, vocab, (1, n))

    def whole():
        a = 0
        for length in steps_of(r, n, step):
            r.prefill_step(toks[:, a : a + length])
            a += length
            mx.clear_cache()

    # warm-up: the whole prompt once, so every step's kernels are built before the timed run (each step's
    # attention has shapes of its own; building them inside the timed run would time the compiler)
    r.reset()
    whole()
    r.reset()
    t0 = time.perf_counter()
    whole()
    return n / (time.perf_counter() - t0)


def time_step_at(r: Runner, n: int, step: int, cfg: ModelConfig) -> float:
    """Seconds for the prefill step of `step` tokens that brings the context to n (cache filled to n - step first)."""
    toks = mx.random.randint(0, cfg.vocab_size, (1, step))
    r.fill_context(max(n - step, 1), cfg)
    r.prefill_step(toks)  # warm-up: traces this context's tiling
    r.fill_context(max(n - step, 1), cfg)
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    r.prefill_step(toks)
    return time.perf_counter() - t0


def prefill_estimate(points: dict[int, float], n: int, step: int) -> float:
    """Seconds to prefill n tokens in steps, from measured step times at some contexts: a step's time is
    affine in its context (the MLA scores grow with it, the rest does not), fitted by least squares."""
    xs, ys = np.array(list(points), float), np.array(list(points.values()))
    b, a = np.polyfit(xs, ys, 1) if len(xs) > 1 else (0.0, ys[0])
    ends = np.arange(step, n + step, step).clip(max=n)
    return float(np.sum(a + b * ends))


KEPT_REPORT_GB = 0.5  # resumable_prefill reports memory kept between steps in increments of this


@dataclass
class PrefillProgress:
    done: int  # prompt tokens fed so far
    seconds: float  # sum of the steps' times, over every run
    peak_gb: float  # the largest peak memory of any run's steps
    step_gb: float = 0.0  # the largest working set of one step: its peak minus the memory in use before it
    step_at: int = 0  # the context (tokens fed) after that step


@dataclass
class StepMemory:
    seconds: float
    before: int  # memory in use before the step
    peak: int  # the step's peak
    layers: dict  # layer -> peak while it ran (traced steps only)

    @property
    def held_gb(self) -> float:
        """The step's working set: its peak minus the memory in use before it."""
        return (self.peak - self.before) / 1e9

    def top_layers(self, model, n: int = 3) -> str:
        top = sorted(self.layers.items(), key=lambda kv: -kv[1])[:n]
        return ", ".join(f"{i} ({'KDA' if model.model.layers[i].is_kda else 'MLA'}) {(p - self.before) / 1e9:.2f} GB"
                         for i, p in top)


def measured_step(model, state, toks: mx.array, trace: bool = False) -> StepMemory:
    """One prefill step, timed, with its memory; trace: layer by layer (Model.layer_done; paced steps only,
    a little slower), keeping each layer's peak."""
    layers: dict[int, int] = {}

    def layer_done(i):
        layers[i] = mx.get_peak_memory()
        mx.reset_peak_memory()

    model.layer_done = layer_done if trace else None
    try:
        mx.synchronize()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        prefill_step(model, state, toks)
        seconds = time.perf_counter() - t0
    finally:
        model.layer_done = None
    return StepMemory(seconds, before, max([mx.get_peak_memory(), *layers.values()]), layers)


def resumable_prefill(model, tokens: np.ndarray, path, step: int, budget_s: float, echo=print,
                      trace_gb: float | None = None, each: bool = False):
    """Feed tokens [1, N] into model in steps until the prompt is done or budget_s has passed, carrying on
    from the state saved at `path` if there is one (state_io: its model identity and checksums are checked),
    and save the state and progress there. Returns (state, PrefillProgress). For prompts longer than one
    process may run (a 1M-token prompt at the full shape takes tens of minutes on a data-center GPU).

    trace_gb: run each step layer by layer (measured_step) and, for any step whose working set passes
    trace_gb, print the layers that held the most. each: print every step's time and working set."""
    from pathlib import Path

    from .state_io import load_state, save_state

    path = Path(path)
    if path.exists():
        state, meta = load_state(path, model)
        prog = PrefillProgress(**{k: meta[k] for k in meta if k in PrefillProgress.__dataclass_fields__})
    else:
        state, prog = model.new_state(1), PrefillProgress(0, 0.0, 0.0)
    N = tokens.shape[1]
    start = state.offset
    t_start = time.perf_counter()
    mx.synchronize()
    base = mx.get_active_memory() - state_bytes(state)  # weights and whatever else stays: not the state
    kept = 0.0  # the most memory in use between steps beyond base + the state as allocated
    recent: list[float] = []  # working sets since the last progress line
    length = step_length(0, N, step)  # step 0: generation's own plan for the whole prompt
    while prog.done < N:  # at least one step a run, then as many as the budget allows
        if state.offset > start and time.perf_counter() - t_start >= budget_s:
            break
        mx.synchronize()
        extra = (mx.get_active_memory() - base - state_bytes(state)) / 1e9
        if extra > kept + KEPT_REPORT_GB:  # memory kept between steps that the state does not account for: say when
            echo(f"  before the step from {prog.done}: {extra:.2f} GB in use beyond the weights and the state")
            kept = extra
        m = measured_step(model, state, mx.array(tokens[:, prog.done : prog.done + length]), trace_gb is not None)
        prog.seconds += m.seconds
        prog.done = min(N, prog.done + length)
        held = m.held_gb
        recent.append(held)
        if each:
            echo(f"  step ending at {prog.done}: {m.seconds * 1e3:.0f} ms ({length / m.seconds:.0f} tok/s), "
                 f"working set {held:.2f} GB")
        prog.peak_gb = max(prog.peak_gb, m.peak / 1e9)
        if trace_gb is not None and held > trace_gb:
            echo(f"  step ending at {prog.done}: working set {held:.2f} GB; most held during layers "
                 f"{m.top_layers(model)}; after the last layer {(mx.get_peak_memory() - m.before) / 1e9:.2f} GB")
        if held > prog.step_gb:
            if prog.step_gb and prog.done > 8 * length:  # a new largest working set after the first steps: say when
                echo(f"  step ending at {prog.done}: working set {held:.2f} GB "
                     f"(in use before it {m.before / 1e9:.2f} GB)")
            prog.step_gb, prog.step_at = held, prog.done
        if prog.done % (64 * length) == 0 or prog.done == N:
            echo(f"  {prog.done:>9} / {N} tokens, {prog.seconds:7.1f} s of steps, {prog.done / prog.seconds:7.1f} tok/s, "
                 f"in use {mx.get_active_memory() / 1e9:.1f} GB, peak {prog.peak_gb:.1f} GB, "
                 f"largest step working set {prog.step_gb:.2f} GB (at {prog.step_at}); "
                 f"median of the last {len(recent)} steps {float(np.median(recent)):.2f} GB")
            recent.clear()
    save_state(path, state, model, asdict(prog))
    return state, prog


def state_bytes(state) -> int:
    """Bytes a ModelState holds, MLA pages at their full (allocated) size."""
    return sum(sum(a.nbytes for page in s.pages for a in page) if hasattr(s, "pages") else
               sum(a.nbytes for a in s.arrays().values()) for s in state.layers)


def state_parts(state) -> tuple[int, int]:
    """(MLA cache bytes as allocated, bytes of the rest: the KDA layers' recurrent and conv state)."""
    cache = sum(a.nbytes for s in state.layers if hasattr(s, "pages") for page in s.pages for a in page)
    return cache, state_bytes(state) - cache


DECODE_WARMUP = 4  # tokens time_decode feeds before its timed ones


def batch_of(state, model, rows: int):
    """A BatchState of `rows` slots, each a copy of the batch-1 `state` (a Runner's after fill_context)."""
    from .batch_state import BatchState

    batch = BatchState(model, rows)
    for _ in range(rows):
        batch.add(state)
    return batch


def batch_step(model, batch) -> Callable[[mx.array], mx.array]:
    """The batch engine's greedy step over every slot of a BatchState: tokens [C] -> the next tokens [C] (one
    Model.decode_rows, one argmax for all rows)."""
    def step(y):
        batch.prepare()
        logits = model.decode_rows(y.reshape(batch.capacity, 1), batch)[:, -1]
        batch.advance()
        return mx.argmax(logits, axis=-1)

    return step


def decode_phases(r: Runner, n: int, y: mx.array | None = None, nap: float = 0.0,
                  step: Callable[[mx.array], mx.array] | None = None) -> tuple[mx.array, list[float]]:
    """Decode n tokens greedily, the next step built and queued while the current token is read (after y, or
    after a first token queued here). Returns the last token queued, not yet read, and the seconds spent
    building the steps' graphs, queueing them (MLX encodes the kernels on this thread) and waiting for tokens.
    nap: seconds the host sleeps after queueing each step (benchmarks/decode_kernels.py --nap), counted as
    waiting. step: tokens -> next tokens (default: r's single sequence; batch_step for a batch, with y given)."""
    if step is None:
        def step(y):
            return mx.argmax(r.forward(y.reshape(1, 1))[:, -1], axis=-1)

    if y is None:
        y = step(mx.array([1]))
        mx.async_eval(y)
    spent = [0.0, 0.0, 0.0]
    for _ in range(n):
        t0 = time.perf_counter()
        nxt = step(y)
        t1 = time.perf_counter()
        mx.async_eval(nxt)
        t2 = time.perf_counter()
        if nap:
            time.sleep(nap)
        y.tolist()
        t3 = time.perf_counter()
        spent = [spent[0] + t1 - t0, spent[1] + t2 - t1, spent[2] + t3 - t2]
        y = nxt
    return y, spent


def time_decode(r: Runner, n: int) -> float:
    """Decode tok/s over n tokens (after DECODE_WARMUP untimed ones), the next step queued while one is read;
    r.host_ms keeps the ms a token spent building, queueing and waiting (a decode bound by the host shows it in
    the first two: the same code reads slower in a process whose host thread runs slower)."""
    y, _ = decode_phases(r, DECODE_WARMUP - 1)  # warm-up (the first token queued is one)
    t0 = time.perf_counter()
    y, spent = decode_phases(r, n, y)
    y.item()
    r.host_ms = tuple(1e3 * t / n for t in spent)
    return n / (time.perf_counter() - t0)


def time_batch_decode(r: Runner, cfg: ModelConfig, batch: int, n: int, tokens: int) -> float:
    """Seconds a decode step of `batch` sequences takes at context n (after DECODE_WARMUP untimed steps), the next
    step queued while the tokens are read (as the engines run). Ours: kimi_mlx.batch's engine step (a BatchState of
    `batch` slots, Model.decode_rows, one argmax for all rows). mlx-lm: its BatchGenerator (continuous batching)
    over `batch` prefilled caches. Each row starts from its own token (so rows route to their own experts) and
    decodes greedily without stopping."""
    rng = np.random.default_rng(batch)
    first = [int(t) for t in rng.integers(0, cfg.vocab_size, size=batch)]
    if r.is_ours:
        return _time_ours_batch(r, cfg, first, n, tokens)
    return _time_peer_batch(r, cfg, first, n, tokens)


def _time_ours_batch(r: Runner, cfg: ModelConfig, first: list[int], n: int, tokens: int) -> float:
    r.fill_context(n, cfg)
    batch = batch_of(r.state, r.model, len(first))
    r.state = None
    step = batch_step(r.model, batch)
    y = step(mx.array(first, mx.uint32))
    mx.async_eval(y)
    y, _ = decode_phases(r, DECODE_WARMUP, y, step=step)
    t0 = time.perf_counter()
    y, _ = decode_phases(r, tokens, y, step=step)
    y.tolist()
    return (time.perf_counter() - t0) / tokens


def _time_peer_batch(r: Runner, cfg: ModelConfig, first: list[int], n: int, tokens: int) -> float:
    from mlx_lm.generate import BatchGenerator

    caches = []
    for _ in first:
        r.fill_context(n, cfg)
        caches.append(r.state)
    r.state = None
    B = len(first)
    gen = BatchGenerator(r.model, max_tokens=10**9, completion_batch_size=B, prefill_batch_size=B)
    try:
        gen.insert([[t] for t in first], caches=caches)
        steps = 0
        while steps < DECODE_WARMUP + tokens:
            if steps == DECODE_WARMUP:
                t0 = time.perf_counter()
            _, generated = gen.next()
            steps += bool(generated)
        return (time.perf_counter() - t0) / tokens
    finally:
        gen.close()


def run_batches(runners: list[Runner], cfg: ModelConfig, batches, contexts, tokens: int, echo=print) -> list[dict]:
    """Aggregate decode tok/s (batch x tokens / time) and per-sequence latency (ms a token) of each runner at each
    batch size and context."""
    rows = []
    for n in contexts:
        base = {}
        for B in batches:
            got, lat = {}, {}
            for r in runners:
                mx.reset_peak_memory()
                dt = time_batch_decode(r, cfg, B, n, tokens)
                got[r.name], lat[r.name] = B / dt, dt * 1e3
                rows.append(dict(what="batch_decode", tokens=n, batch=B, runner=r.name, tok_s=B / dt,
                                 ms_per_token=dt * 1e3, peak_gb=mx.get_peak_memory() / 1e9))
                gc.collect()
                mx.clear_cache()
            base.setdefault("kimi-mlx", got["kimi-mlx"])
            parts = [f"{k} {v:9.1f} tok/s ({lat[k]:.1f} ms a token a sequence)" for k, v in got.items()]
            if "mlx-lm" in got:
                parts.append(f"ratio {got['kimi-mlx'] / got['mlx-lm']:.2f}x")
            parts.append(f"kimi-mlx {got['kimi-mlx'] / base['kimi-mlx']:.2f}x its batch {batches[0]}")
            echo(f"decode @{n:>7} batch {B:>3}: " + " | ".join(parts))
    return rows


# Peak memory bandwidth in GB/s by device name, for the "fraction of bandwidth" column.
BANDWIDTH_GBS = {"H200": 4800, "H100": 3350, "M3 Ultra": 819, "M2 Ultra": 800, "M1 Ultra": 800, "M4 Max": 546,
                 "M3 Max": 400, "M2 Max": 400, "M1 Max": 400, "M4 Pro": 273, "M3 Pro": 150, "M2 Pro": 200}


def known_bandwidth() -> float | None:
    name = mx.device_info().get("device_name", "")
    return next((bw for key, bw in BANDWIDTH_GBS.items() if key in name), None)


MLX_BATCH_ENV = ("MLX_MAX_OPS_PER_BUFFER", "MLX_MAX_MB_PER_BUFFER")  # MLX's GPU command-batch limits


def device_line() -> str:
    """The device, its name and MLX's version, and on a GPU MLX's command-batch limits where set (they change
    both the speed and the memory held: a batch keeps its inputs allocated until the device has run all of it;
    kimi_mlx sets MLX_MAX_OPS_PER_BUFFER on Linux, kimi_mlx/__init__.py; the CPU reads neither)."""
    info = mx.device_info()
    name = info.get("device_name") or info.get("architecture", "?")
    gpu = mx.default_device() == mx.gpu
    batch = ", ".join(f"{k}={os.environ[k]}" for k in MLX_BATCH_ENV if k in os.environ and gpu)
    return f"{mx.default_device()} {name}, MLX {mx.__version__}" + (f" ({batch})" if batch else "")


def run(shape: str = "small", contexts=(1024,), prefill=(1024,), decode_tokens: int = 32, step: int = 0,
        bits: int = 4, group_size: int = 64, peer: bool = True, peer_prefill_max: int = 2048,
        bandwidth_gbs: float | None = None, model_path: str | None = None, peer_model: str | None = None,
        step_at=(), echo=print, rounds: int = 1, experts_memory_gb: float | None = None,
        batches=()) -> list[dict]:
    """Measure and print; returns result rows (one per measurement).

    rounds: decode each context this many times per runner, alternating the runners (and their order) so slow
    spells of a shared machine fall on both; tok/s is each runner's median, the ratio the median of the rounds'.

    step_at: contexts at which to time the one prefill step that ends there (cache filled with random
    rows first), with peak memory; from two or more, the time of a whole prefill is estimated.

    model_path: a checkpoint to measure instead of random weights at `shape`; peer_model: an mlx-lm
    checkpoint of the same model to compare against (random weights are shared with mlx-lm directly).

    experts_memory_gb: with model_path, stream the routed experts into this much memory (model/offload.py); each
    decode line then says the pool's hit rate, bytes read per token and time waiting on reads.
    batches: also decode this many sequences together at each context (run_batches: aggregate tok/s and per-sequence
    latency, mlx-lm's BatchGenerator beside ours).
    """
    step_length(0, 1, step)  # a negative step is a one-line error here, before any output
    dtype = activation_dtype()
    bandwidth_gbs = bandwidth_gbs or known_bandwidth()
    echo(f"device: {device_line()}")
    if model_path:
        from .weights.load import load_model

        ours = load_model(model_path, experts_memory_gb=experts_memory_gb)
        if ours.offload is not None:
            echo(ours.offload.line())
        theirs = None
        if peer_model:
            from mlx_lm import load as peer_load

            theirs = peer_load(peer_model)[0]
        q = ours.config.quantization
        quant = f"{q.get('bits')}-bit {q.get('mode', 'affine')} gs{q.get('group_size')}" if q else "unquantized"
        echo(f"model: {model_path} ({quant}); peer: {peer_model or 'none'}")
    else:
        ours, theirs, _ = build(shape, bits, group_size, dtype=dtype, peer=peer)
        quant = f"{bits}-bit affine gs{group_size} (KDA gate/beta projections 8-bit)" if bits else "unquantized"
        echo(f"shape: {shape}, random weights, {quant}, activations {dtype}")
    cfg = ours.config
    active = active_bytes_per_token(ours)
    runners = [Runner("kimi-mlx", ours, True)] + ([Runner("mlx-lm", theirs, False)] if theirs is not None else [])
    rows_in = runners[0].row_dtype()
    echo(f"weights: {weight_bytes(ours) / 1e9:.2f} GB; read per decoded token: {active / 1e9:.3f} GB; "
         f"cache per context token: {cache_bytes_per_token(cfg, rows_in.size)} B ({str(rows_in).split('.')[-1]}); "
         f"kimi-mlx prefill memory: {prefill_memory()}")
    if prefill or step_at:
        plan = f"{step or STREAMED_STEP} tokens (experts streamed)" if ours.offload is not None else describe_steps(step)
        echo(f"prefill steps: kimi-mlx {plan}"
             + (f"; mlx-lm {step or PREFILL_STEP} tokens" if len(runners) > 1 else ""))
    rows = []
    for n in prefill:
        got, peak = {}, {}
        for r in runners:
            if r.name == "mlx-lm" and n > peer_prefill_max:
                continue
            mx.reset_peak_memory()
            got[r.name] = time_prefill(r, n, step, cfg.vocab_size)
            peak[r.name] = mx.get_peak_memory() / 1e9
            rows.append(dict(what="prefill", tokens=n, runner=r.name, tok_s=got[r.name], peak_gb=peak[r.name]))
            r.state = None
            gc.collect()
            mx.clear_cache()
        echo(_line(f"prefill {n:>7}", got, peak=peak))
    weights = weight_bytes(ours)
    steps: dict[int, float] = {}
    lengths: dict[int, int] = {}  # the timed step's length at each context
    for n in step_at:
        ours_r = runners[0]
        step_n = step_length(0, n, step)  # (auto: our plan's step for an n-token prompt; both runners time it)
        lengths[n] = step_n
        dt = time_step_at(ours_r, n, step_n, cfg)
        steps[n] = dt
        peak = mx.get_peak_memory()
        held = mx.get_active_memory()  # every resident model's weights and this state, after the step
        cache = cache_bytes_per_token(cfg) * n
        rows.append(dict(what="prefill_step", tokens=n, runner=ours_r.name, tok_s=step_n / dt, peak_gb=peak / 1e9))
        state = state_bytes(ours_r.state)
        peer_note = ""
        for peer_r in runners[1:]:
            if n > peer_prefill_max:
                mask = cfg.num_attention_heads * step_n * n * 4
                peer_note = (f" | mlx-lm not run: its MLA step builds a heads x {step_n} x {n} float32 score mask "
                             f"({mask / 1e9:.0f} GB a layer; raise --peer-prefill-max to try)")
                continue
            peer_dt = time_step_at(peer_r, n, step_n, cfg)
            rows.append(dict(what="prefill_step", tokens=n, runner=peer_r.name, tok_s=step_n / peer_dt,
                             peak_gb=mx.get_peak_memory() / 1e9))
            peer_note = f" | mlx-lm {step_n / peer_dt:9.1f} tok/s | ratio {peer_dt / dt:.2f}x"
            peer_r.state = None
        others = held - weights - state  # other resident models (the peer)
        echo(f"prefill step at {n:>7}: kimi-mlx {step_n / dt:9.1f} tok/s ({dt:.2f} s for {step_n} tokens), peak "
             f"{peak / 1e9:.1f} GB = weights {weights / 1e9:.1f} + state {state / 1e9:.2f} as allocated (cache "
             f"{cache / 1e9:.2f} in use) + step working set {(peak - held) / 1e9:.2f}"
             + (f" + other resident {others / 1e9:.1f}" if others > 1e8 else "") + f" GB{peer_note}")
        ours_r.state = None
        gc.collect()
        mx.clear_cache()
    if len(steps) > 1 and len(set(lengths.values())) == 1:  # (an auto plan's steps at different lengths: no fit)
        for n in step_at:
            est = prefill_estimate(steps, n, lengths[n])
            echo(f"whole prefill of {n:>7} tokens, estimated from the steps above: {est:.0f} s ({n / est:.0f} tok/s)")
    for n in contexts:
        each: dict[str, list[float]] = {r.name: [] for r in runners}
        peak: dict[str, float] = {}
        for i in range(rounds):
            for r in runners if i % 2 == 0 else runners[::-1]:
                r.fill_context(n - decode_tokens - DECODE_WARMUP, cfg)  # the timed tokens (and warm-up) end at n
                mx.reset_peak_memory()
                before = r.model.offload.snapshot() if r.is_ours and r.model.offload is not None else None
                each[r.name].append(time_decode(r, decode_tokens))
                if before is not None:
                    streamed = r.model.offload.since(before)
                peak[r.name] = max(peak.get(r.name, 0.0), mx.get_peak_memory() / 1e9)
                r.state = None
                gc.collect()
                mx.clear_cache()
        got = {name: float(np.median(v)) for name, v in each.items()}
        for r in runners:
            row = dict(what="decode", tokens=n, runner=r.name, tok_s=got[r.name], peak_gb=peak[r.name],
                       host_ms=list(r.host_ms))
            if rounds > 1:
                row["rounds"] = each[r.name]
            if r.is_ours and bandwidth_gbs:
                row["bandwidth_frac"] = got[r.name] * active / (bandwidth_gbs * 1e9)
            if r.is_ours and r.model.offload is not None:
                row.update(hit_rate=streamed.hit_rate, read_bytes_per_token=streamed.bytes_per_token,
                           read_wait_s_per_token=streamed.wait_per_token, anon_gb=anon_memory_gb())
            rows.append(row)
        ratio = None
        if rounds > 1 and len(each) == 2:
            ratios = [a / b for a, b in zip(each["kimi-mlx"], each["mlx-lm"])]
            ratio = f"ratio {np.median(ratios):.2f}x (median of {rounds} rounds, {min(ratios):.2f}-{max(ratios):.2f})"
        host = runners[0].host_ms  # the last round's
        echo(_line(f"decode @{n:>7}", got, active, bandwidth_gbs, peak, ratio)
             + (f" | kimi-mlx ms a token: build {host[0]:.2f}, queue {host[1]:.2f}, wait {host[2]:.2f}" if host else ""))
        if ours.offload is not None:
            anon = anon_memory_gb()
            echo(f"  streamed experts (last round, warm-up included): hit rate {streamed.hit_rate:.2f}, "
                 f"{streamed.bytes_per_token / 1e6:.1f} MB read/token, "
                 f"{1e3 * streamed.wait_per_token:.1f} ms/token waiting on reads"
                 + (f", anonymous memory {anon:.2f} GB" if anon is not None else ""))
    if batches:
        rows += run_batches(runners, cfg, tuple(batches), contexts, decode_tokens, echo)
    return rows


def anon_memory_gb() -> float | None:
    """This process's anonymous resident memory (RssAnon: what it holds beyond file pages the OS can drop), in
    GB; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return None


def _line(label: str, got: dict, active: int | None = None, bw: float | None = None, peak=None,
          ratio: str | None = None) -> str:
    parts = [f"{k} {v:9.1f} tok/s" + (f" (peak {peak[k]:.1f} GB)" if peak else "") for k, v in got.items()]
    if "mlx-lm" in got and "kimi-mlx" in got:
        parts.append(ratio or f"ratio {got['kimi-mlx'] / got['mlx-lm']:.2f}x")
    if active and "kimi-mlx" in got:
        parts.append(f"{got['kimi-mlx'] * active / 1e9:.0f} GB/s of weights"
                     + (f" ({100 * got['kimi-mlx'] * active / (bw * 1e9):.0f}% of {bw:.0f})" if bw else ""))
    return f"{label}: " + " | ".join(parts)


SAFETENSORS_NAMES = {mx.float32: "F32", mx.bfloat16: "BF16", mx.float16: "F16", mx.uint32: "U32"}


def _bf16_bits(f: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(f, np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _random_tensor(name: str, shape, dtype: mx.Dtype, bits: int, rng: np.random.Generator,
                   scales: np.ndarray | None = None) -> np.ndarray:
    """Random contents for one local-layout tensor, by name: quantized words uniform, scales and biases giving
    zero-centred weights of std ~0.02, norms one, the KDA gates as upstream initialises them, the rest N(0, 0.02)."""
    if dtype == mx.uint32:
        return rng.integers(0, 2**32, size=shape, dtype=np.uint32)
    levels = 2**bits - 1
    if name.endswith(".scales"):
        f = rng.uniform(0.5, 1.5, size=shape).astype(np.float32) * (0.02 / np.sqrt((levels * (levels + 2)) / 12))
    elif name.endswith(".biases"):
        f = -scales * (levels / 2)
    elif "norm" in name.rsplit(".", 1)[-1] or name.endswith("norm.weight"):
        f = np.ones(shape, np.float32)
    elif name.endswith("A_log"):
        f = np.log(rng.uniform(1, 16, shape)).astype(np.float32)
    elif name.endswith("dt_bias"):
        dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), shape))
        f = (dt + np.log(-np.expm1(-dt))).astype(np.float32)
    elif name.endswith("conv_weight"):
        f = rng.standard_normal(shape, dtype=np.float32) * 0.5
    elif name.endswith("embed_tokens.weight"):
        f = rng.standard_normal(shape, dtype=np.float32)
    else:
        f = rng.standard_normal(shape, dtype=np.float32) * (0.01 if name.endswith("correction_bias") else 0.02)
    return f


def write_checkpoint(cfg_d: dict, out, bits: int = 4, group_size: int = 64, dtype=mx.bfloat16, seed: int = 0,
                     echo=None) -> int:
    """Write a random checkpoint of config `cfg_d` to directory `out` in the converter's layout (`kimi-mlx convert
    --bits B --group-size G` of the default recipe, unquantized tensors in `dtype`), one shard a layer, a tensor at
    a time: memory holds one tensor, so the full 48B-A3B shape (~28 GB at 4 bits) is written on a small machine.
    Quantized weights are uniform random words (random routing: every expert equally likely). Returns the bytes."""
    import json
    from pathlib import Path

    from .weights.convert import _group_module, quant_plan, stored_dtype
    from .weights.recipes import make_recipe

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.from_dict(cfg_d)
    recipe = make_recipe(bits, group_size, "affine", None) if bits else None
    plan = quant_plan(cfg, recipe)[0] if recipe else {}
    rng = np.random.default_rng(seed)
    groups = ["embed"] + [f"layer {i}" for i in range(cfg.num_hidden_layers)] + ["head"]
    weight_map, total = {}, 0
    for k, group in enumerate(groups):
        prefix, module = _group_module(cfg, group)
        if plan:
            nn.quantize(module, class_predicate=lambda p, m: plan[prefix + p].to_dict() if prefix + p in plan else False)
        names = dict(tree_flatten(module.parameters()))
        header, offset, specs = {}, 0, []
        for local, arr in names.items():
            name = prefix + local
            quantized = name.rsplit(".", 1)[0] in plan
            dt = arr.dtype if arr.dtype == mx.uint32 else (
                dtype if quantized else stored_dtype(name, mx.float32, dtype))
            nbytes = int(np.prod(arr.shape)) * dt.size
            header[name] = {"dtype": SAFETENSORS_NAMES[dt], "shape": list(arr.shape),
                            "data_offsets": [offset, offset + nbytes]}
            specs.append((name, tuple(arr.shape), dt))
            offset += nbytes
        shard = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(out / shard, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            scales = {}
            for name, shape, dt in specs:
                base = name.rsplit(".", 1)[0]
                t = _random_tensor(name, shape, dt, plan[base].bits if base in plan else bits, rng, scales.get(base))
                if name.endswith(".scales"):
                    scales[base] = t
                if dt == mx.bfloat16:
                    t = _bf16_bits(t)
                elif dt == mx.float16:
                    t = t.astype(np.float16)
                f.write(np.ascontiguousarray(t).tobytes() if t.nbytes < 2**28 else memoryview(np.ascontiguousarray(t)))
                weight_map[name] = shard
        total += offset
        if echo:
            echo(f"wrote {shard} ({offset / 1e9:.2f} GB)")
        del module, names
        gc.collect()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    raw_cfg = dict(cfg_d, dtype=str(dtype).split(".")[-1], kimi_mlx_note="RANDOM WEIGHTS (kimi_mlx.bench)")
    if recipe is not None:
        q = recipe.base.to_dict()
        q.update({path: spec.to_dict() for path, spec in sorted(plan.items()) if spec != recipe.base})
        raw_cfg["quantization"] = q
    (out / "config.json").write_text(json.dumps(raw_cfg, indent=1))
    return total
