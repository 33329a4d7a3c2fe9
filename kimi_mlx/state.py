"""Per-sequence model state: KDA conv tails and recurrent matrices, MLA latent caches.

Layouts (B = batch):
  KDAState.conv       [B, K-1, 3*H*D]   last K-1 pre-conv inputs of q|k|v, model dtype
  KDAState.recurrent  [B, H, Dv, Dk]    float32 (the transpose of fla's [B, H, Dk, Dv])
  MLAState.pages      consecutive pages of cache rows, normed latent | k_pe (W = L + pe columns):
                      each (rows [B, P, W],) or, with cache_bits, mx.quantize's (wq, scales, biases)
  MLAState.length     number of valid cached tokens: the first `length` rows across the pages

MLA pages: the last page grows as the cache does (PAGE_FIRST rows, doubling up to PAGE_GROW, then
PAGE_GROW rows at a time up to PAGE_MAX), by copying that one page into a larger one; a full PAGE_MAX
page stays and the next row opens a new page. So at most one page is ever copied, and the capacity
past the valid rows is under PAGE_GROW rows (or under half the last page while it is small). A step
writes its rows with mx.put_along_axis at rows of a cached arange, which MLX does in place
unless a snapshot still holds that page (then it copies that one page). Setting `length` lower cuts the
cache; later appends overwrite the rows past it.

Arrays are immutable values, so a snapshot is a shallow copy: O(1), exact, and later writes
never change it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import mlx.core as mx

from .config import KDA, ModelConfig
from .errors import KimiError
from .words import count

@dataclass(frozen=True)
class LatentCache:
    """Read-only view of the valid cache rows, as consecutive pages.

    Each page is (rows [B, n, W],) or, quantized, (wq, scales, biases) from mx.quantize of the rows
    with `bits` and `group_size` (groups run along W, so each token is quantized on its own).
    """

    pages: tuple[tuple[mx.array, ...], ...]
    bits: int = 0
    group_size: int = 64

    @property
    def length(self) -> int:
        return sum(p[0].shape[1] for p in self.pages)

    def rows(self, page: tuple[mx.array, ...]) -> mx.array:
        """A page's rows as a dense [B, n, W] array (dequantized if need be)."""
        if not self.bits:
            return page[0]
        return mx.dequantize(*page, group_size=self.group_size, bits=self.bits)

    def spans(self, stop: int, max_rows: int):
        """(start, page-slice) pieces of at most max_rows rows covering cache rows [0, stop)."""
        start = 0
        for page in self.pages:
            n = page[0].shape[1]
            for a in range(0, min(n, stop - start), max_rows):
                b = min(a + max_rows, n, stop - start)
                yield start + a, tuple(x[:, a:b] for x in page)
            start += n
            if start >= stop:
                return



@lru_cache(maxsize=4)
def positions(n: int) -> mx.array:
    """arange(n) int32 on the device, made once per last-page size: the decode mask's positions (an arange in
    a compiled step is a kernel every token) and, sliced, the new row's index (MLAState.decode_slot)."""
    pos = mx.arange(n, dtype=mx.int32)
    mx.eval(pos)
    return pos



PAGE_FIRST = 256
PAGE_GROW = 16384  # beyond this the last page grows linearly: <= 16,384 unused rows (19 MB bf16) per MLA layer
PAGE_MAX = 131072  # a decode step pays a fixed launch cost a page whatever its size (RESULTS.md): 9 pages at 1M
CACHE_GROUP_SIZE = 64  # quantization group along a cache row (576 = 9 groups at the real shape)
CACHE_BITS = (0, 8, 4)  # 0 = the model dtype, unquantized


def page_size(rows: int, first: int = PAGE_FIRST, grow: int = PAGE_GROW, most: int | None = None) -> int:
    """The smallest size of the page growth sequence (`first` doubling up to `grow`, then `grow` rows at a time)
    holding rows, capped at `most` (None: no cap)."""
    size = first
    while size < rows and (most is None or size < most):
        size = size * 2 if size < grow else size + grow
    return size if most is None else min(size, most)


def layer_arrays(layers) -> dict[str, mx.array]:
    """Flat name -> array map of each layer state's arrays(), named layers.{i}.{name}."""
    return {f"layers.{i}.{k}": v for i, s in enumerate(layers) for k, v in s.arrays().items()}


class ContextLimitError(KimiError):
    """A call would take the sequence past the model's context limit."""


@dataclass
class KDAState:
    conv: mx.array
    recurrent: mx.array

    def arrays(self) -> dict[str, mx.array]:
        return {"conv": self.conv, "recurrent": self.recurrent}

    @classmethod
    def from_arrays(cls, arrays: dict[str, mx.array]) -> "KDAState":
        return cls(arrays["conv"], arrays["recurrent"])


def encode_rows(rows: mx.array, bits: int, dtype: mx.Dtype) -> tuple[mx.array, ...]:
    """Cache rows as a page stores them: (rows in dtype,) or, with bits, mx.quantize's (wq, scales, biases)."""
    if not bits:
        return (rows.astype(dtype),)
    return tuple(mx.quantize(rows, group_size=CACHE_GROUP_SIZE, bits=bits))


@dataclass(frozen=True)
class DecodeSlot:
    """What a one-token MLA step needs: every page (read whole, the last page's rows past `row` masked) and
    the new row's index in the last page, an int32 [1, 1, 1] array, so a compiled step keeps its graph until
    a page grows or is added. The index is a view into a cached arange on the device (positions, above):
    nothing is made on the host a token (on CUDA a host-made array lives in managed memory, and the first
    kernel to read it each token waits for its page to move)."""

    pages: tuple
    row: mx.array


@dataclass
class MLAState:
    pages: tuple = ()  # tuple of pages; a single dense [B, n, W] array is taken as one full page
    length: int = 0
    bits: int = 0
    page_first: int = PAGE_FIRST
    page_max: int = PAGE_MAX
    page_grow: int = PAGE_GROW

    def __post_init__(self):
        if self.pages is None:
            self.pages = ()
        elif isinstance(self.pages, mx.array):
            self.pages = ((self.pages,),)
        self.pages = tuple(tuple(p) for p in self.pages)

    @property
    def capacity(self) -> int:
        return sum(p[0].shape[1] for p in self.pages)

    def append(self, new: mx.array) -> LatentCache:
        """Append rows [B, T, W]; returns a view of the valid cache (length rows)."""
        T = new.shape[1]
        rows = self._encode(new)
        pages = list(self.pages)
        done, pos = 0, self.length
        while done < T:
            i, at = self._locate(pages, pos)
            if i == len(pages):
                i, at = self._extend(pages, rows, T - done)
            size = pages[i][0].shape[1]
            n = min(size - at, T - done)
            # never __setitem__: it would mutate an array a snapshot still shares. A scatter at rows that are
            # a view of the cached arange, not a slice update at a host-made offset: on CUDA that offset is a
            # managed buffer its first reader waits for (~0.2 ms a layer) and the update's kernel runs a
            # thread per element of the whole page
            at_rows = positions(size)[at : at + n].reshape(1, n, 1)
            pages[i] = tuple(mx.put_along_axis(p, at_rows, r[:, done : done + n], axis=1)
                             for p, r in zip(pages[i], rows))
            done, pos = done + n, pos + n
        self.pages, self.length = tuple(pages), pos
        return self.view()

    def page_size(self, rows: int) -> int:
        """The smallest size in the growth sequence (see the module docstring) holding rows, <= page_max."""
        return page_size(rows, self.page_first, self.page_grow, self.page_max)

    def _extend(self, pages: list, like: tuple, need: int) -> tuple[int, int]:
        """Room for `need` more rows past the full last page: grow it (one copy) while it is under page_max,
        else open a new page of arrays like `like`'s. Returns (page index, row) where the next row goes."""
        if pages and pages[-1][0].shape[1] < self.page_max:
            n = pages[-1][0].shape[1]
            grow = self.page_size(n + need) - n
            pages[-1] = tuple(mx.pad(p, [(0, 0), (0, grow)] + [(0, 0)] * (p.ndim - 2)) for p in pages[-1])
            return len(pages) - 1, n
        size = self.page_size(need)
        pages.append(tuple(mx.zeros((r.shape[0], size, *r.shape[2:]), r.dtype) for r in like))
        return len(pages) - 1, 0

    def decode_slot(self) -> DecodeSlot | None:
        """Where a one-token step writes and what it reads (see DecodeSlot). Pages past the one that
        receives the row (left by a cut) are dropped and the last page grows (or a page is added) when it is
        full, so the row always lands in the last page. None when the cache has no page yet (the caller
        appends the usual way)."""
        if not self.pages:
            return None
        pages, start = [], 0
        for p in self.pages:
            if start > self.length or (start == self.length and pages):
                break
            pages.append(p)
            start += p[0].shape[1]
        if start == self.length:  # the last kept page is full
            self._extend(pages, pages[-1], 1)
            start = sum(p[0].shape[1] for p in pages)
        self.pages = tuple(pages)
        size = pages[-1][0].shape[1]
        row = self.length - (start - size)
        return DecodeSlot(self.pages, positions(size)[row : row + 1].reshape(1, 1, 1))

    def commit_decode(self, last: tuple) -> None:
        """Take the last page as the step wrote it; the cache is one row longer."""
        self.pages = self.pages[:-1] + (tuple(last),)
        self.length += 1

    def view(self) -> LatentCache:
        valid, left = [], self.length
        for p in self.pages:
            if left <= 0:
                break
            n = min(left, p[0].shape[1])
            valid.append(tuple(a[:, :n] for a in p))
            left -= n
        return LatentCache(tuple(valid), self.bits, CACHE_GROUP_SIZE)

    def arrays(self) -> dict[str, mx.array]:
        """The valid rows, page by page: cache.{j} (or cache.{j}.wq / .scales / .biases when quantized)."""
        out = {}
        for j, page in enumerate(self.view().pages):
            if self.bits:
                out.update({f"cache.{j}.{k}": a for k, a in zip(("wq", "scales", "biases"), page)})
            else:
                out[f"cache.{j}"] = page[0]
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, mx.array]) -> "MLAState":
        """Inverse of arrays(): the pages become full pages; the next append opens a new page."""
        n = len({k.split(".")[1] for k in arrays})
        if any(k.endswith(".wq") for k in arrays):
            pages = [tuple(arrays[f"cache.{j}.{k}"] for k in ("wq", "scales", "biases")) for j in range(n)]
            wq, scales = pages[0][0], pages[0][1]
            bits = wq.shape[-1] * 32 // (scales.shape[-1] * CACHE_GROUP_SIZE)
        else:
            pages, bits = [(arrays[f"cache.{j}"],) for j in range(n)], 0
        state = cls(tuple(pages), 0, bits)
        state.length = state.capacity
        return state

    def _encode(self, new: mx.array) -> tuple[mx.array, ...]:
        return encode_rows(new, self.bits, self.pages[0][0].dtype if self.pages else new.dtype)

    @staticmethod
    def _locate(pages, pos: int) -> tuple[int, int]:
        """(page index, row in it) of cache row pos; index len(pages) when pos is past the last page."""
        for i, p in enumerate(pages):
            size = p[0].shape[1]
            if pos < size:
                return i, pos
            pos -= size
        return len(pages), 0


@dataclass(frozen=True)
class ContextUsage:
    used: int
    limit: int

    @property
    def left(self) -> int:
        return max(0, self.limit - self.used)

    def __str__(self) -> str:
        return f"{self.used:,} / {count(self.limit, 'token', ',')} ({self.left:,} left)"


@dataclass
class ModelState:
    layers: list[KDAState | MLAState]
    offset: int = 0  # tokens consumed so far
    batch_size: int = 1

    def snapshot(self) -> "ModelState":
        """An O(1) exact copy; restore() brings this state back."""
        return ModelState([replace(s) for s in self.layers], self.offset, self.batch_size)

    def restore(self, snap: "ModelState") -> None:
        s = snap.snapshot()
        self.layers, self.offset, self.batch_size = s.layers, s.offset, s.batch_size

    def arrays(self) -> dict[str, mx.array]:
        """Flat name -> array map of the valid state (for eval, save and byte counts)."""
        return layer_arrays(self.layers)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays().values())

    def eval(self) -> None:
        mx.eval(list(self.arrays().values()))


def context_usage(state: ModelState, limit: int) -> ContextUsage:
    """Tokens used and left in this sequence; limit is the model's config.max_position_embeddings."""
    return ContextUsage(state.offset, limit)


def check_context(state: ModelState, new_tokens: int, limit: int) -> None:
    """Raise ContextLimitError (one line) if feeding new_tokens would pass the context limit."""
    if state.offset + new_tokens > limit:
        raise ContextLimitError(
            f"context full: {count(state.offset, 'token', ',')} used + {new_tokens:,} new would exceed the model's "
            f"limit of {count(limit, 'token', ',')} (model_max_length); start a new conversation or shorten the input"
        )


def new_state(cfg: ModelConfig, batch_size: int = 1, dtype: mx.Dtype = mx.float32, cache_bits: int = 0) -> ModelState:
    """A fresh state; cache_bits 8 or 4 stores the MLA latent caches quantized (0: in dtype)."""
    if cache_bits not in CACHE_BITS:
        raise KimiError(f"cache_bits must be 0 (off), 8 or 4; got {cache_bits!r}")
    if cache_bits and cfg.latent_dim % CACHE_GROUP_SIZE:
        raise KimiError(
            f"a quantized MLA cache needs kv_lora_rank + qk_rope_head_dim divisible by {CACHE_GROUP_SIZE}, "
            f"got {cfg.latent_dim}; use cache_bits=0"
        )
    layers: list[KDAState | MLAState] = []
    P = cfg.kda_num_heads * cfg.kda_head_dim
    for t in cfg.layer_types:
        if t == KDA:
            layers.append(
                KDAState(
                    conv=mx.zeros((batch_size, cfg.conv_kernel_size - 1, 3 * P), dtype=dtype),
                    recurrent=mx.zeros((batch_size, cfg.kda_num_heads, cfg.kda_head_dim, cfg.kda_head_dim), mx.float32),
                )
            )
        else:
            layers.append(MLAState(bits=cache_bits))
    return ModelState(layers, 0, batch_size)
