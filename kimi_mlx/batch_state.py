"""The ragged batched state: C slots (rows) of sequences at their own lengths, decoded one token a step together.

Layouts (C = capacity, the slots; rows past the running ones are free and compute on zeros):
  KDA layers   KDAState with conv [C, K-1, 3*H*D] and recurrent [C, H, Dv, Dk]: each slot its own row.
  MLA layers   BatchLatent: one page (rows [C, P, W], or mx.quantize's (wq, scales, biases)) and a length per
               slot. Kimi Linear's MLA has no positions (NoPE), so slots at different lengths differ only in
               where a step writes their new cache row (slot b's row goes to row lens[b], one put_along_axis
               with per-slot indices) and which rows its query may see (scores past lens[b] masked).

The lengths live on the device ([C] int32, advanced by one op a step for the occupied slots), so a step makes
nothing on the host. P follows MLAState's page-size sequence (PAGE_FIRST doubling to PAGE_GROW, then PAGE_GROW
at a time): the page grows (one copy) when the longest slot's next row would not fit, and shrinks when the
slots left fit in a quarter of it; C grows by doubling up to max_batch when no slot is free and shrinks when
the occupied slots fit in its first quarter. A slot joins by a copy of that one sequence into its row (slice
updates of each array); a slot leaves by being marked free: the other slots' caches are not copied then. Copies
of every slot happen only at those growths and shrinks, which the factor of four between them keeps to at most
one per as many joins or leaves as the slots they copy. Free slots below the highest occupied one still
decode (zeros' tokens, masked to their row 0) until a shrink cuts them off or the slots are compacted.

`compact()` moves the occupied slots to the front and cuts the capacity and the page to what they need (one
copy of every array, a layer at a time): what makes a row that leaves (removed, or paused by a server's preemption)
give its memory back at once. The batch engine (batch.py) compacts before a step whenever the running rows need
fewer slots than the capacity: every step computes every slot, so idle slots would cost each step what a row does
(a matrix-vector product a row), while a compaction costs one copy when a row crosses a power of two.
`layout_bytes` is the layout's size arithmetic, shared with the server's memory bound (server/worker.py
StateSize), so the two cannot drift.

Arrays are values: a StateMark-like `mark()` (the KDA arrays and the lengths) keeps what a slot held before a
step, and `extract` reads a slot back as a batch-1 ModelState (its MLA rows are append-only, so rows below
the marked length are still the slot's while it runs).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from .errors import KimiError
from .state import (CACHE_GROUP_SIZE, PAGE_FIRST, DecodeSlot, KDAState, MLAState, ModelState, encode_rows, layer_arrays,
                    page_size)


def _bits(bits: int) -> str:
    return f"{bits}-bit" if bits else "unquantized"


def _pad(a: mx.array, axis: int, n: int) -> mx.array:
    if n <= 0:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, n)
    return mx.pad(a, widths)


def _cut(a: mx.array, axis: int, n: int) -> mx.array:
    """The first n entries along axis, as a fresh contiguous array (so the larger one is freed)."""
    return mx.contiguous(a[(slice(None),) * axis + (slice(0, n),)])


def _put_row(a: mx.array, b: int, x: mx.array) -> mx.array:
    """a with x (one row, [1, ...] no larger than a's rows) written at slot b, leading corner: a new array."""
    return mx.slice_update(a, x.astype(a.dtype), mx.array([b] + [0] * (a.ndim - 1), mx.int32),
                           tuple(range(a.ndim)))


def slots_for(sequences: int, max_batch: int, capacity: int = 1) -> int:
    """The capacity holding `sequences` occupied slots: `capacity` (at least 1) doubled until it does, at most
    max_batch (how add grows it)."""
    c = max(capacity, 1)
    while c < min(sequences, max_batch):
        c = min(max_batch, 2 * c)
    return c


def layout_bytes(slots: int, rows: int, slot_bytes: int, row_bytes: int, copies: int = 1) -> int:
    """Bytes of the batched layout: `slots` slots, each the per-sequence fixed part (`slot_bytes`: the KDA
    state) and a page of page_size(rows) MLA rows (`row_bytes`: one row over every MLA layer). copies=2 counts a
    growing page's transient copy (the old page and the new one)."""
    return slots * (slot_bytes + copies * page_size(rows) * row_bytes)


class BatchLatent:
    """One MLA layer's cache for every slot: a page of P rows per slot and the slots' lengths (the shared device
    array of BatchState). Quacks like MLAState for Model._decode_each (decode_slot, commit_decode)."""

    def __init__(self, owner: "BatchState", page: tuple, bits: int):
        self.owner, self.page, self.bits = owner, page, bits

    def decode_slot(self) -> DecodeSlot:
        return DecodeSlot((self.page,), self.owner.rows_in)

    def commit_decode(self, last: tuple) -> None:
        self.page = tuple(last)

    def arrays(self) -> dict[str, mx.array]:
        return {f"page.{i}": a for i, a in enumerate(self.page)}


@dataclass
class BatchMark:
    """What every slot held before a step: the KDA arrays (replaced wholesale by a step) and the lengths."""

    kda: dict  # layer -> (conv, recurrent)
    lens: list[int]


class BatchState:
    """C slots of sequences at their own lengths (see the module docstring)."""

    def __init__(self, model, max_batch: int):
        self.model, self.max_batch = model, max_batch
        self.capacity = 0
        self.layers: list = []  # KDAState (batched arrays) or BatchLatent, as ModelState.layers
        self.lens: list[int] = []  # MLA rows held per slot (= its tokens fed; 0 for a free slot)
        self.used: list[bool] = []
        self.bits: int | None = None  # the MLA cache's quantization (the first sequence's)
        self.rows = 0  # P, the page's rows
        self.rows_in = None  # [C, 1, 1] int32 on the device: the row each slot's next token writes
        self._step = None  # [C] int32 on the device: 1 for an occupied slot, 0 for a free one

    # slots ------------------------------------------------------------------------------------------------------

    @property
    def running(self) -> int:
        return sum(self.used)

    def add(self, state: ModelState) -> int:
        """Copy a batch-1 state into a free slot (growing the capacity if none is free); returns the slot."""
        bits = next((s.bits for s in state.layers if isinstance(s, MLAState)), 0)
        if not self.running and bits != self.bits:
            self.bits, self.layers = bits, []
        elif bits != self.bits:
            raise KimiError(f"a sequence whose MLA cache is {_bits(bits)} cannot join a batch whose cache is "
                            f"{_bits(self.bits)}; use one cache_bits for every sequence")
        if not self.layers:
            self._build(state)
        if all(self.used):
            self._resize(min(self.max_batch, max(1, 2 * self.capacity)))
        b = self.used.index(False)
        n = self._mla_rows(state)
        if n + 1 > self.rows:
            self._grow_rows(page_size(n + 1))
        for i, (mine, s) in enumerate(zip(self.layers, state.layers)):
            if isinstance(mine, KDAState):
                self.layers[i] = KDAState(_put_row(mine.conv, b, s.conv), _put_row(mine.recurrent, b, s.recurrent))
            else:
                rows = s.view().pages
                if rows:  # the sequence's cache, page after page, into the slot's leading rows
                    parts = [mx.concatenate([p[k] for p in rows], axis=1) if len(rows) > 1 else rows[0][k]
                             for k in range(len(rows[0]))]
                    mine.page = tuple(_put_row(a, b, x) for a, x in zip(mine.page, parts))
        self.used[b], self.lens[b] = True, n
        self._lengths_changed()
        return b

    def free(self, b: int) -> None:
        """The slot leaves: nothing is copied; it decodes zeros' garbage until reused or cut off."""
        self.used[b], self.lens[b] = False, 0
        self._lengths_changed()

    def _mla_rows(self, state: ModelState) -> int:
        lengths = {s.length for s in state.layers if isinstance(s, MLAState)}
        if len(lengths) > 1:
            raise KimiError("a state whose MLA layers hold different lengths cannot join a batch")
        return lengths.pop() if lengths else 0

    def _build(self, like: ModelState) -> None:
        """Empty layers of one slot, shaped like `like`'s."""
        W = self.model.config.kv_lora_rank + self.model.config.qk_rope_head_dim
        self.layers = []
        for s in like.layers:
            if isinstance(s, KDAState):
                self.layers.append(KDAState(mx.zeros_like(s.conv), mx.zeros_like(s.recurrent)))
            else:
                page = encode_rows(mx.zeros((1, PAGE_FIRST, W), self.model.dtype), self.bits, self.model.dtype)
                self.layers.append(BatchLatent(self, tuple(mx.zeros_like(a) for a in page), self.bits))
        self.capacity, self.rows, self.lens, self.used = 1, PAGE_FIRST, [0], [False]

    def _each(self, kda, mla) -> None:
        for i, s in enumerate(self.layers):
            if isinstance(s, KDAState):
                self.layers[i] = KDAState(kda(s.conv), kda(s.recurrent))
            else:
                s.page = tuple(mla(a) for a in s.page)

    def _resize(self, c: int) -> None:
        """Capacity c slots: pad with free slots, or cut free slots off the end."""
        n = c - self.capacity
        if n > 0:
            self._each(lambda a: _pad(a, 0, n), lambda a: _pad(a, 0, n))
            self.lens += [0] * n
            self.used += [False] * n
        elif n < 0:
            self._each(lambda a: _cut(a, 0, c), lambda a: _cut(a, 0, c))
            del self.lens[c:], self.used[c:]
        self.capacity = c
        self._lengths_changed()

    def _grow_rows(self, p: int) -> None:
        self._each(lambda a: a, lambda a: _pad(a, 1, p - self.rows) if p > self.rows else _cut(a, 1, p))
        self.rows = p

    def _lengths_changed(self) -> None:
        self.rows_in = None

    # steps ------------------------------------------------------------------------------------------------------

    def prepare(self, rows: int = 1) -> None:
        """Before a step: room in the page for every slot's next `rows` rows (a verification's T, else one);
        shrink where slots left; the device lengths."""
        if not self.running:
            return
        top = max(b for b, u in enumerate(self.used) if u) + 1
        c = self.capacity
        while c > 1 and top <= c // 4:  # a quarter: shrinking and growing again copy the rows at most once per
            c //= 2                     # as many joins or leaves (no back and forth at a boundary)
        if c < self.capacity:
            self._resize(c)
        want = page_size(max(self.lens) + rows)
        if want > self.rows or 4 * want <= self.rows:
            self._grow_rows(want)
        if self.rows_in is None:
            self.rows_in = mx.array(self.lens, mx.int32).reshape(-1, 1, 1)
            self._step = mx.array(self.used, mx.int32).reshape(-1, 1, 1)

    def advance(self) -> None:
        """After a step: each occupied slot holds one more row."""
        self.lens = [n + u for n, u in zip(self.lens, self.used)]
        self.rows_in = self.rows_in + self._step

    def keep(self, kept: list[int], after: dict) -> None:
        """After a verification of T rows a slot (model/verify.verify_batch): occupied slot b keeps its first
        kept[b] rows (1..T). Its KDA arrays become those after row kept[b] (one copy of the slots' state,
        whatever T); its length counts those rows, so the rows written past them are masked and overwritten
        by its next step as any row past a slot's length is."""
        for i, (convs, recs) in after.items():
            pick = [max(k, 1) - 1 for k in kept]  # (a free slot: any row)
            self.layers[i] = KDAState(mx.concatenate([convs[t][b : b + 1] for b, t in enumerate(pick)]),
                                      mx.concatenate([recs[t][b : b + 1] for b, t in enumerate(pick)]))
        self.lens = [n + (k if u else 0) for n, k, u in zip(self.lens, kept, self.used)]
        self._lengths_changed()

    def mark(self) -> BatchMark:
        return BatchMark({i: (s.conv, s.recurrent) for i, s in enumerate(self.layers) if isinstance(s, KDAState)},
                         list(self.lens))

    def restore(self, mark: BatchMark) -> None:
        """Back to `mark` (taken over the same slots): each KDA layer's arrays and each slot's length as they were
        then. Rows the MLA pages gained since lie past the lengths, where the next steps write over them."""
        for i, (conv, recurrent) in mark.kda.items():
            self.layers[i] = KDAState(conv, recurrent)
        self.lens = list(mark.lens)
        self._lengths_changed()

    def extract(self, b: int, mark: BatchMark, offset: int) -> ModelState:
        """Slot b as it was at `mark`, as a batch-1 ModelState holding `offset` tokens (evaluated: the slices
        hold no reference to the live page afterwards, so the next step still writes it in place)."""
        layers = []
        n = mark.lens[b]
        for i, s in enumerate(self.layers):
            if isinstance(s, KDAState):
                conv, rec = mark.kda[i]
                layers.append(KDAState(mx.contiguous(conv[b : b + 1]), mx.contiguous(rec[b : b + 1])))
            else:
                page = tuple(mx.contiguous(a[b : b + 1, :n]) for a in s.page) if n else ()
                layers.append(MLAState((page,) if n else (), n, s.bits))
        state = ModelState(layers, offset, 1)
        state.eval()
        return state

    @property
    def nbytes(self) -> int:
        """Bytes the batch holds now (every slot, pages as allocated)."""
        return sum(a.nbytes for a in self.arrays().values())

    def bytes_with(self, rows: int, bits: int = 0, n: int = 1) -> int:
        """Bytes the batch would hold with n more sequences of `rows` MLA rows joined (and room for their next row):
        every slot is as long as the page, so a long sequence costs its length in every slot (a server's memory
        bound reads this before a join)."""
        if not self.layers:
            self.bits = bits
            self._build(self.model.new_state(1, cache_bits=bits))
        slot = row = 0
        for s in self.layers:
            if isinstance(s, KDAState):
                slot += (s.conv.nbytes + s.recurrent.nbytes) // self.capacity
            else:
                row += sum(a.nbytes for a in s.page) // (self.capacity * self.rows)
        return layout_bytes(slots_for(self.running + n, self.max_batch, self.capacity), max([rows, *self.lens]) + 1,
                            slot, row)

    def compact(self) -> list[int] | None:
        """Move the occupied slots to the front (in slot order), cut the capacity to the smallest holding them
        (slots_for) and the page to the growth size holding the longest slot's next row, if that makes the batch
        smaller; None if it would not. Every array is copied, a layer at a time (each evaluated before the next,
        so the transient is one layer's copy). Returns the old slot of each new occupied slot (new slot i held
        old slot order[i]). Any BatchMark taken before is stale afterwards."""
        order = [b for b, u in enumerate(self.used) if u]
        if not self.layers:
            return None
        if not order:  # nothing runs: drop the arrays (the next add builds them again)
            self.layers, self.capacity, self.rows, self.lens, self.used = [], 0, 0, [], []
            self._lengths_changed()
            return []
        c = slots_for(len(order), self.max_batch)
        p = min(self.rows, page_size(max(self.lens) + 1))
        if c >= self.capacity and p >= self.rows:
            return None
        idx = mx.array(order + [order[0]] * (c - len(order)), mx.int32)  # (free slots: any content)
        for i, s in enumerate(self.layers):
            if isinstance(s, KDAState):
                self.layers[i] = KDAState(mx.take(s.conv, idx, axis=0), mx.take(s.recurrent, idx, axis=0))
                mx.eval(self.layers[i].conv, self.layers[i].recurrent)
            else:
                s.page = tuple(mx.contiguous(mx.take(a, idx, axis=0)[:, :p]) for a in s.page)
                mx.eval(*s.page)
        self.lens = [self.lens[b] for b in order] + [0] * (c - len(order))
        self.used = [True] * len(order) + [False] * (c - len(order))
        self.capacity, self.rows = c, p
        self._lengths_changed()
        return order

    def arrays(self) -> dict[str, mx.array]:
        return layer_arrays(self.layers)

    def eval(self) -> None:
        mx.eval(list(self.arrays().values()))


__all__ = ["BatchLatent", "BatchMark", "BatchState", "CACHE_GROUP_SIZE", "layout_bytes", "page_size", "slots_for"]
