"""Prefix-state cache: exact ModelState snapshots keyed by the token prefix they have consumed.

The recurrent state cannot be trimmed, so reuse means: restore the longest stored prefix of a new prompt
and feed only the rest. Keys live in a dict by (length, prefix hash); a lookup hashes every prefix of the
prompt at once (numpy) and checks the stored lengths from the longest down, comparing the tokens of a
hit in full, so a hash collision can cost a miss but never a wrong state.

Memory is counted per array buffer, not per entry: snapshots share the arrays they have in common (MLA
cache pages that were full before both were taken), so the cache holds a reference count per buffer and
an entry's eviction frees only the buffers no other entry still holds. Entries are evicted least recently
used first until the held bytes fit the budget.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..state import ModelState

_MULT = np.uint64(0x9E3779B97F4A7C15)


def prefix_hashes(tokens) -> np.ndarray:
    """h[n] identifies tokens[:n] (h[0] = 0): a position-weighted sum, wrapping in uint64."""
    t = np.asarray(tokens, dtype=np.uint64) + np.uint64(1)
    with np.errstate(over="ignore"):
        weights = np.cumprod(np.full(len(t), _MULT, dtype=np.uint64))
        return np.concatenate([np.zeros(1, np.uint64), np.cumsum(t * weights, dtype=np.uint64)])


def state_buffers(obj) -> list[mx.array]:
    """Every mx.array a state holds (any dataclass/tuple/list nesting), each once."""
    found: dict[int, mx.array] = {}

    def walk(x):
        if isinstance(x, mx.array):
            found[id(x)] = x
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            for f in dataclasses.fields(x):
                walk(getattr(x, f.name))
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(obj)
    return list(found.values())


@dataclass
class Entry:
    tokens: np.ndarray  # int32 [n]
    state: ModelState
    buffers: list[mx.array]


@dataclass
class CacheStats:
    entries: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int
    tokens_reused: int


class PrefixCache:
    """LRU map from token prefixes to state snapshots under a byte budget. Thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, int], Entry] = OrderedDict()
        self._lengths: dict[int, int] = {}  # stored length -> number of entries with it
        self._refs: dict[int, tuple[mx.array, int]] = {}  # id(buffer) -> (buffer, entries holding it)
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.tokens_reused = 0

    def lookup(self, tokens, max_len: int | None = None) -> tuple[int, ModelState | None]:
        """(n, a fresh copy of the state after tokens[:n]) for the longest stored n <= max_len; (0, None) if none."""
        max_len = len(tokens) if max_len is None else min(max_len, len(tokens))
        with self._lock:
            candidates = sorted((n for n in self._lengths if 0 < n <= max_len), reverse=True)
            if candidates:
                arr = np.asarray(tokens[: candidates[0]], dtype=np.int32)
                hashes = prefix_hashes(arr)
                for n in candidates:
                    key = (n, int(hashes[n]))
                    entry = self._entries.get(key)
                    if entry is not None and np.array_equal(entry.tokens, arr[:n]):
                        self._entries.move_to_end(key)
                        self.hits += 1
                        self.tokens_reused += n
                        return n, entry.state.snapshot()
            self.misses += 1
            return 0, None

    def has(self, tokens) -> bool:
        """Whether the state after exactly `tokens` is stored (no effect on LRU order or the counts)."""
        arr = np.asarray(tokens, dtype=np.int32)
        if len(arr) == 0:
            return False
        with self._lock:
            entry = self._entries.get((len(arr), int(prefix_hashes(arr)[-1])))
            return entry is not None and np.array_equal(entry.tokens, arr)

    def touch(self, tokens) -> None:
        """Mark the state after exactly `tokens` as used now (it is evicted last)."""
        arr = np.asarray(tokens, dtype=np.int32)
        key = (len(arr), int(prefix_hashes(arr)[-1])) if len(arr) else None
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)

    def insert(self, tokens, state: ModelState) -> bool:
        """Store a snapshot of `state`, which has consumed exactly `tokens`. False if it cannot fit."""
        if self.max_bytes <= 0 or len(tokens) == 0:
            return False
        arr = np.asarray(tokens, dtype=np.int32)
        key = (len(arr), int(prefix_hashes(arr)[-1]))
        snap = state.snapshot()
        buffers = state_buffers(snap)
        mx.eval(buffers)
        with self._lock:
            old = self._entries.get(key)
            if old is not None and np.array_equal(old.tokens, arr):
                self._entries.move_to_end(key)
                return True
            if old is not None:
                self._drop(key)
            new_bytes = sum(b.nbytes for b in buffers if id(b) not in self._refs)
            if new_bytes > self.max_bytes:
                return False
            self._entries[key] = Entry(arr, snap, buffers)
            self._lengths[key[0]] = self._lengths.get(key[0], 0) + 1
            for b in buffers:
                held, count = self._refs.get(id(b), (b, 0))
                self._refs[id(b)] = (held, count + 1)
            self._bytes += new_bytes
            while self._bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
            return key in self._entries

    def clear(self) -> None:
        with self._lock:
            for key in list(self._entries):
                self._drop(key)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(len(self._entries), self._bytes, self.max_bytes, self.hits, self.misses,
                              self.tokens_reused)

    def _drop(self, key) -> None:
        entry = self._entries.pop(key)
        n = key[0]
        self._lengths[n] -= 1
        if not self._lengths[n]:
            del self._lengths[n]
        for b in entry.buffers:
            held, count = self._refs[id(b)]
            if count == 1:
                del self._refs[id(b)]
                self._bytes -= held.nbytes
            else:
                self._refs[id(b)] = (held, count - 1)
