"""Where each routed expert's bytes lie in a checkpoint's safetensors shards, and reads of exactly those bytes.

A safetensors file is an 8-byte little-endian header length, a JSON header ({name: {dtype, shape,
data_offsets: [begin, end]}}, offsets relative to the end of the header) and the tensors' bytes, row-major. An
expert bank [E, rows, cols] (this project's converted layout and mlx-lm's `switch_mlp`) therefore holds expert e's
rows as one contiguous run of bytes at begin + e * (end - begin) / E; the HF layout stores each expert as its own
tensor (`block_sparse_moe.experts.{e}.w1/w3/w2`). Either way an expert is a few contiguous runs (weight, scales and
biases of gate, up and down: 9 runs quantized, 3 unquantized), each read with one os.preadv straight into the
destination buffer (the offload pool's slot, model/offload.py): no bank is ever loaded, no copy is made on the way.

Shards are opened once, when the model loads, and read through those descriptors: a shard truncated while the
model runs is a short read, said in one line (WeightsError); a shard replaced or deleted meanwhile keeps being read
as it was when opened (POSIX keeps an open file's bytes).
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import WeightsError

ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "U32": 4, "I32": 4, "U8": 1, "I8": 1, "U16": 2, "F64": 8, "I64": 8}
PROJS = ("gate_proj", "up_proj", "down_proj")
HF_PROJ = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
KEYS = ("weight", "scales", "biases")
LOCAL_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.")


@dataclass(frozen=True)
class Tensor:
    file: int  # index into ExpertFiles.paths
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


@dataclass(frozen=True)
class Run:
    """One contiguous run of an expert's bytes: `nbytes` at `offset` of file `file`, for (proj, key)."""
    proj: str
    key: str
    file: int
    offset: int
    nbytes: int
    dtype: str


def read_header(path: Path) -> dict[str, Tensor]:
    """The tensors of one safetensors file, absolute offsets."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than a header")
            (n,) = struct.unpack("<Q", raw)
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: unreadable safetensors header ({e}); the file is truncated or corrupt") from None
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        b, e = t["data_offsets"]
        out[name] = Tensor(-1, t["dtype"], tuple(t["shape"]), 8 + n + b, 8 + n + e)
    return out


class ExpertFiles:
    """The routed experts of a checkpoint, by (layer, expert): runs of bytes and reads of them."""

    def __init__(self, paths: list[Path]):
        self.paths = list(paths)
        self.tensors: dict[str, Tensor] = {}
        for k, p in enumerate(self.paths):
            for name, t in read_header(p).items():
                self.tensors[name] = Tensor(k, t.dtype, t.shape, t.begin, t.end)
        self.fds: list[int] | None = None
        self._runs: dict[tuple[int, int], list[Run]] = {}

    def open(self) -> None:
        if self.fds is None:
            fds = []
            for p in self.paths:
                try:
                    fds.append(os.open(p, os.O_RDONLY))
                except OSError as e:
                    for fd in fds:
                        os.close(fd)
                    raise WeightsError(f"{p}: cannot open the shard ({e.strerror}); the checkpoint is incomplete") \
                        from None
            self.fds = fds

    def close(self) -> None:
        if self.fds is not None:
            for fd in self.fds:
                os.close(fd)
            self.fds = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def has_layer(self, i: int) -> bool:
        return any(self._bank_name(i, p, "weight") for p in PROJS) or self._hf_name(i, 0, "gate_proj") in self.tensors

    def _bank_name(self, i: int, proj: str, key: str) -> str | None:
        for mid in ("experts", "switch_mlp"):  # this project's layout, mlx-lm's
            name = f"model.layers.{i}.mlp.{mid}.{proj}.{key}"
            if name in self.tensors:
                return name
        return None

    @staticmethod
    def _hf_name(i: int, e: int, proj: str) -> str:
        return f"model.layers.{i}.block_sparse_moe.experts.{e}.{HF_PROJ[proj]}.weight"

    def runs(self, i: int, e: int, num_experts: int) -> list[Run]:
        """Expert e of layer i: its runs in (gate, up, down) x (weight, scales, biases) order."""
        key = (i, e)
        if key in self._runs:
            return self._runs[key]
        out = []
        for proj in PROJS:
            if self._bank_name(i, proj, "weight"):
                for k in KEYS:
                    name = self._bank_name(i, proj, k)
                    if name is None:
                        continue
                    t = self.tensors[name]
                    if t.shape[0] != num_experts:
                        raise WeightsError(f"tensor '{name}' holds {t.shape[0]} experts, config.json says "
                                           f"{num_experts}; the checkpoint does not match its config")
                    per = (t.end - t.begin) // num_experts
                    out.append(Run(proj, k, t.file, t.begin + e * per, per, t.dtype))
            else:
                name = self._hf_name(i, e, proj)
                if name not in self.tensors:
                    raise WeightsError(f"checkpoint is missing tensor '{name}'; the checkpoint is incomplete")
                t = self.tensors[name]
                out.append(Run(proj, "weight", t.file, t.begin, t.end - t.begin, t.dtype))
        self._runs[key] = out
        return out

    def read(self, run: Run, into: np.ndarray, what: str) -> int:
        """Read one run into `into` (a writable uint8 buffer of run.nbytes); returns the bytes read."""
        if self.fds is None:
            self.open()
        view = memoryview(into)
        got = 0
        while got < run.nbytes:
            try:
                n = os.preadv(self.fds[run.file], [view[got:]], run.offset + got)
            except OSError as e:
                raise WeightsError(f"{self.paths[run.file]}: read of {what} failed ({e.strerror}); check the disk "
                                   "and the checkpoint") from None
            if n == 0:
                size = os.fstat(self.fds[run.file]).st_size
                raise WeightsError(f"{self.paths[run.file]}: {what} lies at bytes {run.offset}-{run.offset + run.nbytes}"
                                   f" but the shard ends at {size}; it is truncated, re-download or re-convert it")
            got += n
        return got


def expert_tensor(name: str) -> bool:
    """Whether a local-layout tensor name is a routed expert bank's."""
    return LOCAL_EXPERT_RE.match(name) is not None
