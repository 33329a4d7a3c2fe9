"""Routed experts streamed from the checkpoint into a bounded pool of slots (load_model(experts_memory_gb=...)).

The dense trunk (embeddings, attention, norms, routers, shared experts, lm_head) is loaded as usual; each MoE layer's
routed experts stay on disk. Every MoE layer owns a pool: one gate|up bank and one down bank of `slots` experts plus
its shared experts (pinned in the last rows, as FusedMoE appends them), allocated once and never reallocated. A
layer call runs the router, brings its routing to the host, and:

  - if the experts the call needs fit the pool (decode: k of E): the missing ones are read from the safetensors
    shards, each expert's own bytes (weights/expert_files.py), in parallel on a thread pool, straight into free or
    least-recently-used slots (the reads write the pool's memory through a NumPy view of it, no copy); the expert
    indices are renumbered to slots and the same expert path as the resident model runs over the pool
    (model/fuse.experts_out: MLX's gather matmuls, or the GPU decode kernels, which take any bank).
  - otherwise (a prefill step touches most experts): the step's working set, a bank of exactly the experts it
    uses in expert order, is filled once (pool hits copied, the rest read) and the same path runs over it; the last
    token's experts then enter the pool for the decode that follows. A layer's working set is freed once the next
    layer's routing has been computed (that evaluation runs this layer's matmuls first), so a step holds at most
    the pools plus one layer's working set.

Each pair's result depends only on its row and its expert's weights, and the pool or working set holds those
weights bit for bit, so the output is exactly the resident model's. Reads write pool slots only after the host
has evaluated this layer's routing, which depends on everything earlier, so no queued computation still reads a
slot being overwritten.

The pools' memory is experts_memory_gb split evenly over the MoE layers (slots = budget / (layers x expert
bytes)); a budget that holds every expert loads the model resident instead (the plain path, unchanged), and one
below top_k experts a layer is refused (minimum_bytes).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import settings
from ..errors import ConfigError, WeightsError
from ..weights.expert_files import PROJS, ExpertFiles, Run
from .fuse import FusedMoE, _as_bank, _bank, _down_bank, _like, experts_out
from .moe import KimiMoE

READ_THREADS = 8  # concurrent preads: an NVMe drive needs several in flight to reach its rate
DTYPES = {"BF16": mx.bfloat16, "F16": mx.float16, "F32": mx.float32, "U32": mx.uint32, "U8": mx.uint8,
          "I32": mx.int32, "U16": mx.uint16, "I8": mx.int8}
NP_DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}
DECODE_PATHS = ("kernel", "union", "wide", "gather")
PREFETCH_ENV = "KIMI_MLX_PREFETCH"

_executor: ThreadPoolExecutor | None = None


def _settle(futures) -> BaseException | None:
    """Wait until every future has ended, even through Ctrl-C (a read still running would write a slot that is
    about to be reused); returns the interruption to re-raise, if any."""
    interrupted = None
    while True:
        try:
            wait(futures)
            return interrupted
        except BaseException as e:
            interrupted = interrupted or e


def executor() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="kimi-experts")
    return _executor


@dataclass
class OffloadStats:
    """Counters over all MoE layers. A lookup is one (layer call, distinct routed expert) the call needed; a hit
    one found in the pool. Decode calls (a few tokens) and prefill steps are counted apart."""
    decode_tokens: int = 0
    decode_lookups: int = 0
    decode_hits: int = 0
    decode_bytes: int = 0
    decode_wait_s: float = 0.0
    prefill_tokens: int = 0
    prefill_lookups: int = 0
    prefill_hits: int = 0
    prefill_bytes: int = 0
    prefill_wait_s: float = 0.0
    evictions: int = 0
    prefetched: int = 0  # experts read ahead on the next layer's router's guess (KIMI_MLX_PREFETCH=on)
    prefetch_used: int = 0  # ... of which the layer's routing then asked for
    prefetch_bytes: int = 0  # bytes those reads read (counted in decode_bytes too)
    pool_bytes: int = 0  # the pools' routed slots, all layers
    expert_bytes: int = 0  # all routed experts of the loaded layers, on disk
    slots: int = 0  # per layer
    experts: int = 0  # routed experts per layer

    def add(self, phase: str, lookups: int, hits: int, nbytes: int, wait: float) -> None:
        setattr(self, f"{phase}_lookups", getattr(self, f"{phase}_lookups") + lookups)
        setattr(self, f"{phase}_hits", getattr(self, f"{phase}_hits") + hits)
        setattr(self, f"{phase}_bytes", getattr(self, f"{phase}_bytes") + nbytes)
        setattr(self, f"{phase}_wait_s", getattr(self, f"{phase}_wait_s") + wait)

    @property
    def hit_rate(self) -> float | None:
        return self.decode_hits / self.decode_lookups if self.decode_lookups else None

    @property
    def bytes_per_token(self) -> float | None:
        return self.decode_bytes / self.decode_tokens if self.decode_tokens else None

    @property
    def wait_per_token(self) -> float | None:
        return self.decode_wait_s / self.decode_tokens if self.decode_tokens else None

    def reset(self) -> None:
        keep = (self.pool_bytes, self.expert_bytes, self.slots, self.experts)
        self.__init__()
        self.pool_bytes, self.expert_bytes, self.slots, self.experts = keep

    def snapshot(self) -> "OffloadStats":
        return OffloadStats(**self.__dict__)

    def since(self, before: "OffloadStats") -> "OffloadStats":
        """The counters accumulated after `before` (a snapshot)."""
        out = self.snapshot()
        for k, v in before.__dict__.items():
            if k not in ("pool_bytes", "expert_bytes", "slots", "experts"):
                setattr(out, k, getattr(out, k) - v)
        return out

    def line(self) -> str:
        head = (f"experts streamed: pool {_size(self.pool_bytes)} of {_size(self.expert_bytes)} "
                f"({self.slots} of {self.experts} a layer)")
        parts = [head]
        if self.decode_tokens:
            parts.append(f"decode: hit rate {self.hit_rate:.2f}, {_size(self.bytes_per_token)} read/token, "
                         f"{1e3 * self.wait_per_token:.1f} ms/token waiting on reads")
        if self.prefetched:
            parts.append(f"prefetch: {self.prefetch_used} of {self.prefetched} guessed experts used")
        if self.prefill_tokens:
            parts.append(f"prefill: {_size(self.prefill_bytes)} read for {self.prefill_tokens} tokens, "
                         f"{self.prefill_wait_s:.2f} s waiting on reads")
        return "; ".join(parts)


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def minimum_bytes(row_bytes: int, top_k: int) -> int:
    """The smallest budget: every MoE layer holds one token's top_k experts (row_bytes: one expert of every layer)."""
    return top_k * row_bytes


def _gb(n: float) -> str:
    """n bytes in GB, 3 significant digits."""
    return f"{n / 1e9:.3g} GB"


def plan_slots(budget_bytes: int, row_bytes: int, num_experts: int, top_k: int, layers: int) -> int | None:
    """Slots per MoE layer for a budget, one slot costing row_bytes (an expert in each of `layers` layers); None
    where every expert fits (load resident). Raises a one-line ConfigError below minimum_bytes."""
    if layers == 0 or budget_bytes >= num_experts * row_bytes:
        return None
    slots = budget_bytes // row_bytes
    if slots < top_k:
        need = minimum_bytes(row_bytes, top_k)
        digits = max(0, 2 - math.floor(math.log10(need / 1e9)))
        at_least = math.ceil(need / 1e9 * 10 ** digits) / 10 ** digits
        raise ConfigError(f"experts memory {_gb(budget_bytes)} is below one token's routed experts ({top_k} a layer x "
                          f"{layers} MoE layers x {row_bytes / layers / 1e6:.3g} MB = {_gb(need)}); give at least "
                          f"{at_least:g} GB")
    return int(slots)


@dataclass
class Part:
    """One array of a pool bank: (bank, key), its per-expert shape and dtype, and where each projection's run
    lands inside an expert's bytes."""
    bank: str  # "gate_up" | "down"
    key: str  # "weight" | "scales" | "biases"
    shape: tuple[int, ...]
    dtype: mx.Dtype
    offsets: dict[str, int] = field(default_factory=dict)  # proj -> byte offset within one expert's row

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.size


def _to_dtype(raw: np.ndarray, src: str, dst: mx.Dtype) -> np.ndarray:
    """A run's bytes in file dtype `src` as bytes of float dtype `dst`, rounded as MLX's astype rounds (to nearest
    even; NaN kept NaN)."""
    if src == "BF16":
        f = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        f = raw.view(NP_DTYPES[src]).astype(np.float32)
    if dst == mx.float32:
        out = f
    elif dst == mx.float16:
        out = f.astype(np.float16)
    elif dst == mx.bfloat16:
        u = f.view(np.uint32)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        out = np.where(np.isnan(f), np.uint16(0x7FC0), r).astype(np.uint16)
    else:
        raise ValueError(f"no cast to {dst}")
    return np.ascontiguousarray(out).view(np.uint8)


def _writable(arr: mx.array) -> np.ndarray | None:
    """A writable uint8 NumPy view [rows, bytes a row] of an evaluated, row-contiguous MLX array's memory, or None
    where MLX gives none that writes its memory (a device whose arrays the host cannot write in place)."""
    raw = arr.view(mx.uint8)
    mx.eval(raw)
    try:
        view = np.asarray(memoryview(raw))
    except (TypeError, ValueError, RuntimeError):
        return None
    if view.nbytes != arr.nbytes or not view.flags.writeable:
        return None
    view = view.reshape(arr.shape[0], -1)
    # live: a byte written through the view is what MLX then reads (not a copy's)
    probe = np.arange(1, min(8, view.shape[1]) + 1, dtype=np.uint8)
    keep = view[0, : probe.size].copy()
    view[0, : probe.size] = probe
    live = np.array_equal(np.array(arr.view(mx.uint8).reshape(arr.shape[0], -1)[0, : probe.size] + 0), probe)
    view[0, : probe.size] = keep
    return view if live else None


LIVE_VIEWS = True  # False: always the host buffers (the fallback; tests run both)


class Bank:
    """A gate|up and a down bank of `rows` experts (the last `shared` rows the shared experts), allocated once.

    Reads write rows through `views`: NumPy views of the arrays' own memory where MLX gives live ones (CPU, Apple
    unified memory; on CUDA MLX moves an array the host touches into managed memory, whose pages then migrate
    between host and card on demand), so a read lands in the slot with no copy; where the views are not live, host
    buffers of the same layout, whose written rows flush() then copies into the arrays (one scatter a part), the
    arrays staying in device memory."""

    def __init__(self, parts: list[Part], rows: int, shared: dict[tuple[str, str], mx.array], templates: dict):
        self.parts, self.rows = parts, rows
        self.arrays: dict[tuple[str, str], mx.array] = {}
        for p in parts:
            routed = rows - (shared[(p.bank, p.key)].shape[0] if shared else 0)
            zeros = mx.zeros((routed, *p.shape), p.dtype)
            self.arrays[(p.bank, p.key)] = mx.concatenate([zeros, shared[(p.bank, p.key)]]) if shared else zeros
        mx.eval(list(self.arrays.values()))
        views = {k: _writable(a) for k, a in self.arrays.items()} if LIVE_VIEWS else {}
        self.live = bool(views) and all(v is not None for v in views.values())
        if not self.live:
            # fresh host buffers, not copies of the arrays: on CUDA the host's first access to an array's memory
            # (a view or a copy through the buffer protocol) moves it into managed memory for good, and a pool in
            # managed memory has its pages migrated to the card on each use and back to the host on each write
            # (reads fill routed rows before flush copies them; the shared rows are never read into)
            views = {k: np.zeros((a.shape[0], a.nbytes // a.shape[0]), np.uint8) for k, a in self.arrays.items()}
        self.views = views
        self.gate_up = _like(templates["gate_up"], {k: a for (b, k), a in self.arrays.items() if b == "gate_up"})
        self.down = _like(templates["down"], {k: a for (b, k), a in self.arrays.items() if b == "down"})

    def copy_row(self, dst: int, src: "Bank", src_row: int) -> None:
        for k, v in self.views.items():
            v[dst] = src.views[k][src_row]

    def flush(self, rows: list[int]) -> None:
        """Make rows written through host buffers the arrays' (nothing to do with live views). The arrays are
        updated in place (the modules hold these same array objects)."""
        if self.live or not rows:
            return
        idx = mx.array(rows)
        for k, a in self.arrays.items():
            a[idx] = mx.array(self.views[k][rows]).view(a.dtype).reshape(len(rows), *a.shape[1:])


class OffloadedMoE(FusedMoE):
    """A MoE layer whose routed experts live in a bounded pool filled from disk (see the module docstring)."""

    host_routed = True  # its call reads the routing back to the host: decode steps run it outside mx.compile

    def __init__(self, moe: KimiMoE, num_shared: int, layer: int, files: ExpertFiles, slots: int, parts: list[Part],
                 stats: OffloadStats):
        nn.Module.__init__(self)
        self.gate = moe.gate
        self.num_routed = E = moe.gate.weight.shape[0]
        self.num_shared = num_shared
        self.top_k = moe.gate.opts["top_k"]
        self.layer, self.files, self.slots, self._parts, self.stats = layer, files, slots, parts, stats
        self.first = False  # the first offloaded layer counts tokens
        ex = moe.experts
        shared = None
        if num_shared:
            sh = moe.shared_experts
            gu = _bank([_as_bank(sh.gate_proj, num_shared), _as_bank(sh.up_proj, num_shared)], axis=1)
            dn = _down_bank(sh.down_proj, num_shared)
            shared = {("gate_up", k): v for k, v in gu.items()} | {("down", k): v for k, v in dn.items()}
            for p in parts:
                got = shared.get((p.bank, p.key))
                if got is None or got.shape[1:] != p.shape or got.dtype != p.dtype:
                    raise WeightsError(f"layer {layer}: the shared expert's {p.bank} {p.key} is stored unlike the "
                                       "routed experts'; load this checkpoint without experts_memory")
        templates = {"gate_up": ex.gate_proj, "down": ex.down_proj}
        self._pool = Bank(parts, slots + num_shared, shared, templates)
        self._templates = templates
        self._shared = shared
        # expert -> slot (-1: not in the pool); the shared experts E + j sit in slots + j for good
        self._table = np.full(E + num_shared, -1, np.int64)
        self._table[E:] = np.arange(slots, slots + num_shared)
        self._lru: OrderedDict[int, int] = OrderedDict()  # expert -> slot, least recently used first
        self._free = list(range(slots))
        # the next offloaded layer (prefetch guesses for it), a plain attribute: as a module it would be a child
        object.__setattr__(self, "_next", None)
        self._pending: list = []  # prefetch reads in flight: (expert, slot, future)
        self._guessed: set[int] = set()  # experts the last prefetch brought in
        from ..ops.experts import kernel_fits

        self.kernel_fits = kernel_fits(self._pool.gate_up, self._pool.down, self.top_k + num_shared)

    @property
    def gate_up_proj(self):  # the resident FusedMoE's names, for code that inspects a layer's banks
        return self._pool.gate_up

    @property
    def down_proj(self):
        return self._pool.down

    def held_bytes(self) -> int:
        """Memory the pool holds: its slots and the shared experts (not among the model's parameters)."""
        return sum(a.nbytes for a in self._pool.arrays.values())

    def active_bytes(self) -> int:
        """Expert bytes one token's decode reads: top_k routed experts and the shared ones."""
        return (self.top_k + self.num_shared) * sum(p.nbytes for p in self._parts)

    def clear(self) -> None:
        """Empty the pool (every routed expert read again when next asked)."""
        self._await_prefetch()
        self._table[: self.num_routed] = -1
        self._lru.clear()
        self._free = list(range(self.slots))

    def resident(self) -> list[int]:
        """The routed experts in the pool, least recently used first."""
        return list(self._lru)

    def __call__(self, x: mx.array) -> mx.array:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        N = flat.shape[0]
        idx, w = self.gate(flat, shared=self.num_shared)
        path = self.path(N, decode=len(shape) == 3 and shape[1] == 1)
        phase = "decode" if path in DECODE_PATHS else "prefill"
        guess = None
        if phase == "decode" and self._next is not None and settings.value(PREFETCH_ENV) == "on":
            guess = self._next.gate(flat)[0]  # the next layer's router on this layer's input: a guess at its experts
            mx.eval(idx, guess)
        host = np.array(idx)  # the host must know the experts before it can read them
        self._await_prefetch()
        if self.first:
            setattr(self.stats, f"{phase}_tokens", getattr(self.stats, f"{phase}_tokens") + N)
        routed = np.unique(host[:, : self.top_k])
        if len(routed) <= self.slots:
            self._ensure(routed, phase)
            ids, bank, n = self._table[host], self._pool, self.slots + self.num_shared
        else:
            ids, bank, n = self._working_set(routed, host, phase)
        out = experts_out(path, flat, mx.array(ids.astype(np.int32)), w, bank.gate_up, bank.down, n)
        if guess is not None:  # read while the device runs this layer's experts and the next layer's attention
            self._next._prefetch(np.unique(np.array(guess)))
        return out.reshape(shape)

    # -- prefetch ----------------------------------------------------------------------------------------------
    def _prefetch(self, experts: np.ndarray) -> None:
        """Start reading the guessed experts not in the pool into slots of their own (this layer's pool is not read
        by anything queued: its last use was the previous token's, which the guessing layer's routing waited for).
        The slots join the pool when this layer next runs (_await_prefetch)."""
        self._await_prefetch()
        misses = [e for e in experts.tolist() if self._table[e] < 0][: self.top_k]
        if not misses:
            return
        slots = self._take_slots(len(misses), set(experts.tolist()))
        futures = [executor().submit(self._read_into, e, self._pool, s) for e, s in zip(misses, slots)]
        self._pending = list(zip(misses, slots, futures))

    def _await_prefetch(self) -> None:
        """Wait for reads started by _prefetch; experts read join the pool, a failed read frees its slot (a guess:
        the routing's own read will say what is wrong, if the expert is needed)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        t0 = time.perf_counter()
        interrupted = _settle([f for _, _, f in pending])
        nbytes = 0
        for e, s, f in pending:
            if f.exception() is not None:
                self._free.append(s)
                continue
            nbytes += f.result()
            self._table[e] = s
            self._lru[e] = s
            self._guessed.add(e)
        self._pool.flush([s for e, s, _ in pending if self._table[e] == s])
        self.stats.decode_wait_s += time.perf_counter() - t0
        self.stats.decode_bytes += nbytes
        self.stats.prefetch_bytes += nbytes
        self.stats.prefetched += len(pending)
        if interrupted is not None:
            raise interrupted

    # -- reads -------------------------------------------------------------------------------------------------
    def _read_into(self, e: int, bank: Bank, row: int) -> int:
        """Expert e's runs into row `row` of `bank`; returns the bytes read."""
        got = 0
        for run in self.files.runs(self.layer, e, self.num_routed):
            part = self._part(run)
            dst = bank.views[(part.bank, part.key)][row]
            what = f"expert {e} of layer {self.layer} ({run.proj} {run.key})"
            if DTYPES.get(run.dtype) == part.dtype:
                got += self.files.read(run, dst[part.offsets[run.proj]: part.offsets[run.proj] + run.nbytes], what)
            else:  # stored in another float dtype than load_model(dtype=...) asks for: read, then cast
                tmp = np.empty(run.nbytes, np.uint8)
                got += self.files.read(run, tmp, what)
                cast = _to_dtype(tmp, run.dtype, part.dtype)
                dst[part.offsets[run.proj]: part.offsets[run.proj] + cast.nbytes] = cast
        return got

    def _part(self, run: Run) -> Part:
        bank = "down" if run.proj == "down_proj" else "gate_up"
        for p in self._parts:
            if p.bank == bank and p.key == run.key:
                return p
        raise WeightsError(f"layer {self.layer}: the checkpoint's {run.proj} has {run.key}, the config implies none")

    def _read_many(self, jobs: list[tuple[int, Bank, int]]) -> tuple[int, float]:
        """Read (expert, bank, row) jobs in parallel; (bytes, seconds waited). Raises the first failure after all
        jobs have ended (none still writes)."""
        if not jobs:
            return 0, 0.0
        t0 = time.perf_counter()
        futures = [executor().submit(self._read_into, e, bank, row) for e, bank, row in jobs]
        nbytes, error = 0, _settle(futures)
        for f in futures:
            if f.exception() is not None:
                error = error or f.exception()
            else:
                nbytes += f.result()
        if error is not None:
            raise error
        return nbytes, time.perf_counter() - t0

    # -- the pool ----------------------------------------------------------------------------------------------
    def _take_slots(self, n: int, keep: set[int]) -> list[int]:
        """n slots: free ones first, then the least recently used experts' not in `keep` (evicted)."""
        out = [self._free.pop() for _ in range(min(n, len(self._free)))]
        for e in list(self._lru):
            if len(out) == n:
                break
            if e in keep:
                continue
            out.append(self._lru.pop(e))
            self._table[e] = -1
            self.stats.evictions += 1
        return out

    def _ensure(self, experts: np.ndarray, phase: str) -> None:
        """Bring `experts` (distinct, at most self.slots) into the pool."""
        want = set(experts.tolist())
        if self._guessed:
            self.stats.prefetch_used += len(want & self._guessed)
            self._guessed = set()
        misses = [e for e in experts.tolist() if self._table[e] < 0]
        for e in experts.tolist():
            if self._table[e] >= 0:
                self._lru.move_to_end(e)
        slots = self._take_slots(len(misses), want)
        try:
            nbytes, wait = self._read_many([(e, self._pool, s) for e, s in zip(misses, slots)])
        except BaseException:
            self._free.extend(slots)  # half-written slots hold no expert
            raise
        for e, s in zip(misses, slots):
            self._table[e] = s
            self._lru[e] = s
        self._pool.flush(slots)
        self.stats.add(phase, len(experts), len(experts) - len(misses), nbytes, wait)

    def _working_set(self, experts: np.ndarray, host: np.ndarray, phase: str):
        """A bank of exactly `experts` (in expert order) and the shared experts, for a call that needs more experts
        than the pool holds: (indices renumbered into it, the bank, its rows)."""
        n = len(experts)
        ws = Bank(self._parts, n + self.num_shared, self._shared, self._templates)
        jobs, hits = [], 0
        for row, e in enumerate(experts.tolist()):
            if self._table[e] >= 0:
                ws.copy_row(row, self._pool, int(self._table[e]))
                hits += 1
            else:
                jobs.append((e, ws, row))
        nbytes, wait = self._read_many(jobs)
        ws.flush(list(range(n)))
        self.stats.add(phase, n, hits, nbytes, wait)
        remap = np.full(self.num_routed + self.num_shared, -1, np.int64)
        remap[experts] = np.arange(n)
        remap[self.num_routed:] = np.arange(n, n + self.num_shared)
        # the last token's experts stay for the decode that follows (copied, not read again)
        last = [e for e in np.unique(host[-1, : self.top_k]).tolist()]
        for e in last:
            if self._table[e] >= 0:
                self._lru.move_to_end(e)
        new = [e for e in last if self._table[e] < 0]
        admitted = self._take_slots(len(new), set(last))
        for e, s in zip(new, admitted):
            self._pool.copy_row(s, ws, int(remap[e]))
            self._table[e] = s
            self._lru[e] = s
        self._pool.flush(admitted)
        return remap[host], ws, n + self.num_shared


class Offload:
    """Plans and builds the OffloadedMoE layers of one model: plan(model) before its weights load, then
    fuse_model(model, offload) calls moe() for each MoE layer."""

    def __init__(self, files: ExpertFiles, budget_bytes: int, cast: mx.Dtype | None = None):
        self.files, self.budget, self.cast = files, budget_bytes, cast
        self.stats = OffloadStats()
        self.slots: int | None = None
        self._parts: dict[int, list[Part]] = {}
        self._last: OffloadedMoE | None = None

    def plan(self, model) -> bool:
        """Size the pools for `model`'s (quantized, not yet loaded) MoE layers: True to stream, False where the
        budget holds every routed expert (load resident). Raises a one-line ConfigError below the minimum."""
        moes = {i: model.model.layers[i].mlp for i in model.owned if isinstance(model.model.layers[i].mlp, KimiMoE)}
        if not moes:
            return False
        self._parts = {i: self.parts(i, m) for i, m in moes.items()}
        row = sum(sum(p.nbytes for p in parts) for parts in self._parts.values())  # one slot in every layer
        E = model.config.num_experts
        top_k = model.config.num_experts_per_token
        slots = plan_slots(self.budget, row, E, top_k, len(moes))
        if slots is None:
            return False
        self.slots = slots
        self.stats.slots, self.stats.experts = slots, E
        self.stats.pool_bytes, self.stats.expert_bytes = slots * row, E * row
        return True

    def parts(self, i: int, moe: KimiMoE) -> list[Part]:
        """Layer i's pool arrays, from its (never evaluated) expert modules' shapes and the files' dtypes."""
        ex = moe.experts
        E = moe.gate.weight.shape[0]
        runs = {(r.proj, r.key): r for r in self.files.runs(i, 0, E)}
        out: dict[tuple[str, str], Part] = {}
        for proj in PROJS:
            mod = getattr(ex, proj)
            bank = "down" if proj == "down_proj" else "gate_up"
            for key in ("weight", "scales", "biases"):
                if key not in mod:
                    continue
                run = runs.get((proj, key))
                if run is None:
                    raise WeightsError(f"checkpoint is missing tensor 'model.layers.{i}.mlp.experts.{proj}.{key}'; "
                                       "the checkpoint is incomplete")
                dtype = DTYPES.get(run.dtype)
                if dtype is None:
                    raise WeightsError(f"layer {i} {proj}.{key}: dtype {run.dtype} cannot be streamed")
                if self.cast is not None and mx.issubdtype(dtype, mx.floating):
                    dtype = self.cast
                shape = tuple(mod[key].shape[1:])
                if math.prod(shape) * DTYPES[run.dtype].size != run.nbytes:
                    raise WeightsError(f"layer {i} {proj}.{key}: {run.nbytes} bytes an expert on disk, config.json "
                                       f"implies {math.prod(shape) * DTYPES[run.dtype].size}; the checkpoint does not "
                                       "match its config")
                p = out.get((bank, key))
                if p is None:
                    out[(bank, key)] = Part(bank, key, shape, dtype, {proj: 0})
                else:  # up rows after gate rows
                    if p.dtype != dtype or p.shape[1:] != shape[1:]:
                        raise ConfigError(f"layer {i}: experts_memory needs gate and up stored alike")
                    p.offsets[proj] = p.nbytes
                    p.shape = (p.shape[0] + shape[0], *shape[1:])
        return list(out.values())

    def moe(self, i: int, moe: KimiMoE, num_shared: int) -> OffloadedMoE:
        layer = OffloadedMoE(moe, num_shared, i, self.files, self.slots, self._parts[i], self.stats)
        layer.first = self._last is None
        if self._last is not None:
            object.__setattr__(self._last, "_next", layer)
        self._last = layer
        return layer
