"""Pipeline parallelism over MLX's distributed backend (ring over TCP/Thunderbolt, MPI, NCCL).

The layers are split into contiguous ranges, one per rank, balanced by weight bytes; each rank loads
only its own tensors and keeps only its own layers' state. A call `model(tokens, state)` runs on
every rank at once (SPMD): rank 0 embeds, each rank sends its hidden states to the next, the last
rank computes the logits and broadcasts them, so every rank samples the same token. When a peer dies
the others get "[ring] connection to a peer was lost" from MLX, which becomes a one-line KimiError.
"""

from __future__ import annotations

import json
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .errors import KimiError, first_line

INIT_TIMEOUT_S = 60.0
_real_stderr: int | None = None  # the terminal's stderr while quiet_backend_noise() filters fd 2


class DistributedError(KimiError):
    pass


@dataclass
class Pipeline:
    group: object  # mx.distributed.Group
    layers: range  # the layer ids this rank owns

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def size(self) -> int:
        return self.group.size()

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.size - 1

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except RuntimeError as e:
            if "[ring]" in str(e) or "peer" in str(e) or "distributed" in str(e).lower():
                raise DistributedError(f"rank {self.rank}: lost contact with another rank ({e}); stopping") from None
            raise

    def recv(self, shape, dtype) -> mx.array:
        return mx.distributed.recv(shape, dtype, self.rank - 1, group=self.group)

    def send(self, h: mx.array) -> None:
        self.eval(mx.distributed.send(h, self.rank + 1, group=self.group))

    def broadcast_from_last(self, x: mx.array) -> mx.array:
        """x on the last rank (zeros of the same shape elsewhere) -> x on every rank."""
        return mx.distributed.all_sum(x if self.last else mx.zeros_like(x), group=self.group)

    def eval(self, *arrays) -> None:
        self._guard(mx.eval, *arrays)


WATCHDOG = """
import os, select, signal, sys, time
fd, pid, timeout, msg = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
ready, _, _ = select.select([fd], [], [], timeout)
if not ready:
    sys.stderr.write("error: " + msg + "\\n")
    sys.stderr.flush()
    os.kill(pid, signal.SIGKILL)
"""


def init(backend: str = "any", timeout: float | None = None):
    """mx.distributed.init with a deadline: an unreachable rank is an error, not a hang.

    MLX's init blocks inside C++ without releasing the GIL, so the deadline is kept by a small
    watchdog process that prints the error and stops this one if init has not returned in time.
    """
    import subprocess
    import sys

    timeout = INIT_TIMEOUT_S if timeout is None else timeout
    msg = f"could not reach every rank within {timeout:.0f} s; check the hostfile and that all ranks started"
    r, w = os.pipe()
    dog = subprocess.Popen([sys.executable, "-c", WATCHDOG, str(r), str(os.getpid()), str(timeout), msg],
                           pass_fds=(r,), stderr=_real_stderr)
    os.close(r)
    try:
        return mx.distributed.init(strict=True, backend=backend)
    except Exception as e:  # backend missing or misconfigured
        text = first_line(e)
        raise DistributedError(f"distributed backend '{backend}' did not start ({text})") from None
    finally:
        os.write(w, b"1")
        os.close(w)
        dog.wait()


def launched() -> bool:
    """True when started by mlx.launch (or any launcher that sets MLX's rank variables)."""
    return any(k in os.environ for k in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "MLX_WORLD_SIZE"))


def launch_rank() -> int:
    """This process's rank as the launcher set it (0 when not launched), known before init()."""
    for k in ("MLX_RANK", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(k, "").isdigit():
            return int(os.environ[k])
    return 0


def tensor_bytes(path: Path) -> dict[str, int]:
    """Byte size of every tensor in a checkpoint, from the safetensors headers alone."""
    sizes = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                a, b = info["data_offsets"]
                sizes[name] = b - a
    return sizes


def plan(layer_bytes: list[int], first_extra: int, last_extra: int, ranks: int) -> list[range]:
    """Split layers into `ranks` contiguous ranges minimising the largest rank's bytes.

    first_extra / last_extra: bytes that live on the first / last rank (embedding; norm + lm_head).
    """
    n = len(layer_bytes)
    if ranks > n:
        raise DistributedError(f"{ranks} ranks for {n} layers; use at most {n} ranks")
    cost = list(layer_bytes)
    cost[0] += first_extra
    cost[-1] += last_extra
    lo, hi = max(cost), sum(cost)
    while lo < hi:  # binary search on the largest share
        mid = (lo + hi) // 2
        if len(_cut(cost, mid)) <= ranks:
            hi = mid
        else:
            lo = mid + 1
    cuts = _cut(cost, lo)
    while len(cuts) < ranks:  # split the largest range further if some rank would be idle
        i = max(range(len(cuts)), key=lambda j: len(cuts[j]))
        r = cuts[i]
        mid = r.start + len(r) // 2
        cuts[i : i + 1] = [range(r.start, mid), range(mid, r.stop)]
    return cuts


def _cut(cost: list[int], cap: int) -> list[range]:
    out, start, acc = [], 0, 0
    for i, c in enumerate(cost):
        if acc + c > cap and i > start:
            out.append(range(start, i))
            start, acc = i, 0
        acc += c
    out.append(range(start, len(cost)))
    return out


def layer_plan(path: Path, num_layers: int, ranks: int) -> list[range]:
    sizes = tensor_bytes(path)
    per_layer = [0] * num_layers
    first = last = 0
    for name, b in sizes.items():
        parts = name.split(".")
        if name.startswith("model.layers.") and parts[2].isdigit() and int(parts[2]) < num_layers:
            per_layer[int(parts[2])] += b
        elif "embed_tokens" in name:
            first += b
        else:
            last += b
    return plan(per_layer, first, last, ranks)


# The words of the ring backend's per-socket messages. It writes each word to the unbuffered std::cerr
# separately, from several socket threads at once, so a lost peer can print interleaved fragments
# ("[ring] [ring] Sending to Receiving from socket 5 ...", "104"): a line made only of these words and
# numbers is noise, whatever their order. A number can lose the space after it ("socket 7was closed"), so a
# line is read as runs of digits and runs of other non-space bytes.
NOISE_WORDS = frozenset(b"[ring] Socket was closed by the peer Sending Receiving to from socket failed with errno made "
                        b"no progress Too many send/recv errors. Failing pending tasks...".split())


def is_noise(line: bytes) -> bool:
    words = re.findall(rb"\d+|[^\s\d]+", line)
    return bool(words) and all(w in NOISE_WORDS or w.isdigit() for w in words)


def quiet_backend_noise() -> None:
    """Drop the ring backend's repeated per-socket messages from stderr (our own error says it once)."""
    import atexit
    import sys

    global _real_stderr
    real = _real_stderr = os.dup(2)
    r, w = os.pipe()
    os.dup2(w, 2)
    os.close(w)

    def pump():
        with os.fdopen(r, "rb") as src:
            for line in src:
                if not is_noise(line):
                    os.write(real, line)

    t = threading.Thread(target=pump, daemon=True)
    t.start()

    def flush():
        sys.stderr.flush()
        os.dup2(real, 2)  # closes the pipe's last writer, so pump() sees EOF
        t.join(timeout=2)

    atexit.register(flush)


def setup(path: Path, num_layers: int, backend: str = "any") -> Pipeline | None:
    """The Pipeline of this process, or None for a single-process run."""
    quiet_backend_noise()
    group = init(backend)
    if group.size() == 1:
        return None
    ranges = layer_plan(path, num_layers, group.size())
    return Pipeline(group, ranges[group.rank()])
