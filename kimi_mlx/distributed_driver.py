"""Driver/worker mode: rank 0 runs the program, the other ranks mirror its model calls.

Chat and serve read input on one rank only, so under pipeline parallelism (kimi_mlx/distributed.py)
rank 0 is the *driver*: it runs the program (tokenizer, sampling, output) with a `DriverModel`, which
looks like a Model. Every other rank runs `work()`: a loop that repeats each model call and each state
operation of the driver on its own layers, so ChatSession, the server engine and generate run unchanged.

Commands are rows of OP_INTS ints, broadcast from rank 0 with mx.distributed.all_sum: a header of HEADER
ints (a count, then rows), and the rest in a second message when a batch is longer. State operations
(new state, snapshot, restore, mark, rewind, drop) are queued and go with the next model call, so a
decoded token costs one extra small collective. Workers need only the tokens' shape (rank 0 embeds).
Driver objects and their worker twins share an id; when the driver's object is garbage collected its
twin is dropped with the next batch. Session files: every rank writes its own part (FILE on rank 0,
FILE.rank<r> on rank r, each on its own machine) and loads it back; a mismatch is one line.

While the driver is idle (a human typing, a server without requests) the ranks meet once every TICK_S
seconds and sleep in between, so no rank spins on its socket and a lost rank is noticed within a tick;
an idle rank that hears nothing for SILENCE_LIMIT_S (a peer asleep or unplugged, its connection still
open) stops. Any failure of a rank ends every rank with one line (`error: ...`): the others cannot go
on without its layers.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import random
import sys
import threading
import time
import weakref
from collections import deque
from contextlib import contextmanager
from enum import IntEnum
from pathlib import Path

import mlx.core as mx

from .errors import KimiError, first_line
from .state import ModelState, check_context
from .state_io import META_KEY, load_state, mark, rewind, save_state
from .words import count
from . import distributed

HEADER = 64  # ints per header: a count, then up to 12 command rows
OP_INTS = 5  # op, then up to four arguments
MESSAGE_BYTES = 4096  # a worker's error message (one line; a longer one is cut)
IDLE_AFTER_S = 1.0  # without a command for this long, the ranks meet only every TICK_S
TICK_S = 0.1
SILENCE_LIMIT_S = 60.0  # an idle rank that hears nothing for this long stops (a machine asleep, a cable out)


class Op(IntEnum):
    NEW = 1  # id, batch, cache_bits
    CALL = 2  # state id, B, T: model(tokens, state) (logits broadcast from the last rank)
    HIDDEN = 3  # state id, B, T: model.hidden(tokens, state)
    SNAPSHOT = 4  # new id, state id
    RESTORE = 5  # state id, snapshot id
    MARK = 6  # new id, state id
    REWIND = 7  # state id, mark id
    DROP = 8  # id
    SAVE = 9  # state id, path bytes, save token; then the path, then a status
    LOAD = 10  # new id, path bytes, save token, offset; then the path, then a status
    IDLE = 11  # nothing; the worker waits TICK_S before the next message
    STOP = 12


class Link:
    """The command channel: ints and bytes broadcast from rank 0, and a status back from the others."""

    def __init__(self, pipeline):
        self.p = pipeline
        self.pending: deque = deque()  # command rows not sent yet (finalizers append from any thread)
        self.lock = threading.RLock()
        self.ids = itertools.count(1)
        self.last_used = time.monotonic()
        self.wanted = False  # the program waits for the link while the idle ticker holds it
        self.closed = False
        self.deadline: tuple[float, str] | None = None  # (monotonic time, message) for the watchdog

    @contextmanager
    def bounded(self, message: str | None):
        """A wait that should end soon: past SILENCE_LIMIT_S the watchdog ends the program with message
        (None: an unbounded wait)."""
        self.deadline = (time.monotonic() + SILENCE_LIMIT_S, message) if message else None
        try:
            yield
        finally:
            self.deadline = None

    def watchdog(self) -> None:
        """Thread: a collective that blocks in C++ cannot be interrupted, so a lost peer that never
        closed its connection would hang it; this ends the program instead."""
        while True:
            time.sleep(0.5)
            d = self.deadline
            if d is not None and time.monotonic() > d[0]:
                fatal(d[1])

    def _sum(self, x: mx.array) -> mx.array:
        x = mx.distributed.all_sum(x, group=self.p.group)
        self.p.eval(x)
        return x

    # -- rank 0 -------------------------------------------------------------------------------
    def queue(self, op: Op, *args: int) -> None:
        self.pending.append((int(op), *args, *[0] * (OP_INTS - 1 - len(args))))

    def adopt(self, obj, op: Op, *args: int):
        """Give obj an id, queue the command that makes its twin, and drop the twin when obj goes."""
        obj.remote_id = next(self.ids)
        self.queue(op, obj.remote_id, *args)
        weakref.finalize(obj, self.queue, Op.DROP, obj.remote_id).atexit = False
        return obj

    def flush(self) -> None:
        rows = []
        while self.pending:
            rows.extend(self.pending.popleft())
        ints = [len(rows), *rows]
        self._sum(mx.array(ints[:HEADER] + [0] * max(0, HEADER - len(ints)), mx.int32))
        if len(ints) > HEADER:
            self._sum(mx.array(ints[HEADER:], mx.int32))

    def send_bytes(self, data: bytes) -> None:
        self._sum(mx.array(list(data), mx.uint8))

    def status(self) -> None:
        """Raise the first failing worker's message (after a command that can fail on a worker)."""
        flags = self._sum(mx.zeros((self.p.size,), mx.int32)).tolist()
        failed = [r for r, f in enumerate(flags) if f]
        if failed:
            msg = bytes(self._sum(mx.zeros((MESSAGE_BYTES,), mx.uint8)).tolist()).rstrip(b"\0")
            raise KimiError(f"rank {failed[0]}: {msg.decode(errors='replace')}")

    @contextmanager
    def command(self, op: Op, *args: int):
        """Send op (after the queued rows) and run the body while holding the link; a failure after the
        send leaves the ranks out of step, so it ends the program (one line) rather than raise."""
        self.wanted = True
        with self.lock:
            self.wanted = False
            if self.closed:
                raise SystemExit(0)  # the program is ending; a late caller thread just stops
            self.queue(op, *args)
            try:
                self.flush()
                yield
            except KimiError as e:
                if op in (Op.SAVE, Op.LOAD) and not isinstance(e, distributed.DistributedError):
                    raise  # a worker refused the file; every rank is still in step
                fatal(str(e))
            except BaseException as e:
                fatal(f"rank 0 stopped mid-command ({type(e).__name__}: {e}); stopping every rank")
            finally:
                self.last_used = time.monotonic()

    def idle_ticker(self) -> None:
        """Thread: after IDLE_AFTER_S without commands, hold the link and meet the workers once a tick
        (each tick is a collective, so a lost rank is noticed) until the program wants the link."""
        while not self.closed:
            time.sleep(TICK_S)
            if time.monotonic() - self.last_used < IDLE_AFTER_S or not self.lock.acquire(blocking=False):
                continue
            try:
                silent = None  # the first meeting waits until every rank has finished its last command
                while not self.closed and not self.wanted:
                    self.queue(Op.IDLE)
                    with self.bounded(silent):
                        self.flush()
                    silent = (f"rank 0: no answer from the other ranks for {SILENCE_LIMIT_S:.0f} s "
                              "(a machine asleep or the network down); stopping")
                    time.sleep(TICK_S)
            except Exception as e:
                fatal(str(e) if isinstance(e, KimiError) else f"rank 0: {type(e).__name__}: {e}")
            finally:
                self.last_used = time.monotonic()
                self.lock.release()

    def close(self) -> None:
        """Tell the workers to exit (at the end of the program)."""
        self.wanted = True
        with self.lock:
            if not self.closed:
                self.closed = True
                self.queue(Op.STOP)
                try:
                    self.flush()
                except KimiError:
                    pass

    # -- ranks > 0 ----------------------------------------------------------------------------
    def receive(self) -> list[tuple[int, ...]]:
        head = self._sum(mx.zeros((HEADER,), mx.int32)).tolist()
        n = head[0]
        ints = head[1 : 1 + n]
        if n > HEADER - 1:
            ints += self._sum(mx.zeros((n - HEADER + 1,), mx.int32)).tolist()
        return [tuple(ints[i : i + OP_INTS]) for i in range(0, n, OP_INTS)]

    def receive_bytes(self, n: int) -> bytes:
        return bytes(self._sum(mx.zeros((n,), mx.uint8)).tolist())

    def report(self, error: str | None) -> None:
        flags = mx.zeros((self.p.size,), mx.int32)
        if error is not None:
            flags[self.p.rank] = 1
        failed = [r for r, f in enumerate(self._sum(flags).tolist()) if f]
        if failed:
            mine = error.encode()[: MESSAGE_BYTES] if failed[0] == self.p.rank else b""
            self._sum(mx.array(list(mine.ljust(MESSAGE_BYTES, b"\0")), mx.uint8))


def fatal(message: str):
    """End this rank now with one line on the terminal's stderr (bypassing the backend-noise filter)."""
    fd = distributed._real_stderr if distributed._real_stderr is not None else 2
    os.write(fd, f"error: {message}\n".encode())
    os._exit(1)


class DriverState(ModelState):
    """Rank 0's part of a state; its other parts are twins on the workers with the same remote_id."""

    link: Link

    @classmethod
    def adopt(cls, link: Link, s: ModelState, op: Op, *args: int) -> "DriverState":
        state = cls(s.layers, s.offset, s.batch_size)
        state.link = link
        return link.adopt(state, op, *args)

    def snapshot(self) -> "DriverState":
        return DriverState.adopt(self.link, ModelState.snapshot(self), Op.SNAPSHOT, self.remote_id)

    def restore(self, snap: "DriverState") -> None:
        s = ModelState.snapshot(snap)  # a local copy: no twin is made for it
        self.layers, self.offset, self.batch_size = s.layers, s.offset, s.batch_size
        self.link.queue(Op.RESTORE, self.remote_id, snap.remote_id)

    def marked(self, m) -> None:  # called by state_io.mark
        self.link.adopt(m, Op.MARK, self.remote_id)

    def rewound(self, m) -> None:  # called by state_io.rewind
        self.link.queue(Op.REWIND, self.remote_id, m.remote_id)


class DriverModel:
    """The model on rank 0: each call also runs on the other ranks. Anything else is the Model's."""

    def __init__(self, model, link: Link):
        self.inner, self.link = model, link

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def new_state(self, batch_size: int = 1, cache_bits: int = 0) -> DriverState:
        s = self.inner.new_state(batch_size, cache_bits)  # checks the arguments before anything is sent
        return DriverState.adopt(self.link, s, Op.NEW, batch_size, cache_bits)

    def hidden(self, tokens: mx.array, state: DriverState | None = None):
        return self._run(Op.HIDDEN, self.inner.hidden, tokens, state)

    def __call__(self, tokens: mx.array, state: DriverState | None = None) -> mx.array:
        return self._run(Op.CALL, self.inner, tokens, state)

    def _run(self, op: Op, fn, tokens: mx.array, state):
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
        B, T = tokens.shape
        state = self.new_state(B) if state is None else state
        if state.batch_size != B:
            raise ValueError(f"state holds batch {state.batch_size}, tokens have batch {B}")
        check_context(state, T, self.config.max_position_embeddings)  # refused here, before any rank starts
        with self.link.command(op, state.remote_id, B, T):
            return fn(tokens, state)

    # -- session files (state_io.save_state / load_state call these) ----------------------------
    def save_parts(self, path, state: DriverState, extra: dict) -> None:
        if not Path(path).parent.is_dir():  # before any rank writes its part
            raise KimiError(f"{path}: directory {Path(path).parent} does not exist")
        token = random.getrandbits(31)
        data = str(path).encode()
        with self.link.command(Op.SAVE, state.remote_id, len(data), token):
            self.link.send_bytes(data)
            self.link.status()
        save_state(path, state, self.inner, {**extra, "pipeline": part_info(self.inner, token)})

    def load_parts(self, path) -> tuple[DriverState, dict]:
        check_part(path, peek_pipeline(path), part_info(self.inner, None))
        s, meta = load_state(path, self.inner)
        token = meta["pipeline"]["save"]
        state = DriverState(s.layers, s.offset, s.batch_size)
        state.link, state.remote_id = self.link, next(self.link.ids)
        data = str(path).encode()
        with self.link.command(Op.LOAD, state.remote_id, len(data), token, s.offset):
            self.link.send_bytes(data)
            self.link.status()
        weakref.finalize(state, self.link.queue, Op.DROP, state.remote_id).atexit = False
        return state, meta

    def close(self) -> None:
        self.link.close()


def part_path(path, rank: int) -> Path:
    return Path(path) if rank == 0 else Path(f"{path}.rank{rank}")


def part_info(model, token: int | None) -> dict:
    p = model.pipeline
    return {"rank": p.rank, "ranks": p.size, "layers": [model.owned.start, model.owned.stop], "save": token}


def peek_pipeline(path) -> dict | None:
    """The 'pipeline' record of a session file's metadata ({} if it is not a readable session file)."""
    try:
        _, raw = mx.load(str(path), format="safetensors", return_metadata=True)
        return json.loads(raw[META_KEY]).get("pipeline")
    except Exception:
        return {}  # load_state says what is wrong with it


def check_part(path, got: dict | None, want: dict) -> None:
    if got == {}:
        return
    if got is None:
        raise KimiError(f"{path}: saved by a single-process run; a distributed run loads only sessions it saved")
    if (got.get("ranks"), got.get("layers"), got.get("rank")) != (want["ranks"], want["layers"], want["rank"]):
        raise KimiError(f"{path}: saved by {got.get('ranks')} ranks with another layer split; load it with the "
                        "same ranks and checkpoint it was saved with")
    if want["save"] is not None and got.get("save") != want["save"]:
        raise KimiError(f"{path}: this part is from another save than rank 0's file; save the session again")


def work(model) -> None:
    """Ranks > 0: mirror rank 0's commands until it stops (exit 0) or is lost (one line, exit 1)."""
    link, objs = Link(model.pipeline), {}
    threading.Thread(target=link.watchdog, name="kimi-mlx-watchdog", daemon=True).start()
    silent = None  # rank 0 may still be loading; once it speaks, it speaks at least once a tick
    try:
        while True:
            with link.bounded(silent):
                rows = link.receive()
            silent = (f"rank {link.p.rank}: no word from rank 0 for {SILENCE_LIMIT_S:.0f} s (its machine asleep "
                      "or the network down); stopping")
            for row in rows:
                if row[0] == Op.STOP:
                    raise SystemExit(0)
                _do(model, link, objs, *row)
            if rows and rows[-1][0] == Op.IDLE:
                time.sleep(TICK_S)
    except KimiError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # Ctrl-C on this rank's terminal: the others stop too (they lose this rank)
        print(f"error: rank {link.p.rank}: interrupted; stopping", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except Exception as e:  # a fault here: say it in one line; rank 0 notices the lost rank
        print(f"error: rank {link.p.rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def _do(model, link: Link, objs: dict, op: int, a: int, b: int, c: int, d: int) -> None:
    if op == Op.NEW:
        objs[a] = model.new_state(b, c)
    elif op in (Op.CALL, Op.HIDDEN):
        state = objs[a]
        (model if op == Op.CALL else model.hidden)(mx.zeros((b, c), mx.int32), state)
        state.eval()
    elif op == Op.SNAPSHOT:
        objs[a] = objs[b].snapshot()
    elif op == Op.RESTORE:
        objs[a].restore(objs[b])
    elif op == Op.MARK:
        objs[a] = mark(objs[b])
    elif op == Op.REWIND:
        rewind(objs[a], objs[b])
    elif op == Op.DROP:
        objs.pop(a, None)
    elif op in (Op.SAVE, Op.LOAD):
        path = part_path(link.receive_bytes(b).decode(), link.p.rank)
        try:
            if op == Op.SAVE:
                save_state(path, objs[a], model, {"pipeline": part_info(model, c)})
            else:
                check_part(path, peek_pipeline(path), part_info(model, c))
                state, _ = load_state(path, model)
                if state.offset != d:
                    raise KimiError(f"{path}: holds {count(state.offset, 'token')}, rank 0's part {d}; "
                                    "save the session again")
                objs[a] = state
        except Exception as e:
            link.report(first_line(e))
        else:
            link.report(None)


def start(path: Path):
    """The model of this rank under mlx.launch: rank 0 gets a DriverModel; the other ranks serve it here
    and exit when rank 0's program ends (so code after this call runs on rank 0 only)."""
    from .weights.load import load_model

    if not distributed.launched():
        raise KimiError("--distributed: no ranks to join (MLX_RANK is not set); start the command through "
                        "mlx.launch, see docs/distributed.md")
    model = load_model(path, distributed=True)
    if model.pipeline is None:
        return model
    if not model.pipeline.first:
        work(model)
    driver = DriverModel(model, Link(model.pipeline))
    atexit.register(driver.close)
    for job in (driver.link.idle_ticker, driver.link.watchdog):
        threading.Thread(target=job, daemon=True).start()
    return driver
