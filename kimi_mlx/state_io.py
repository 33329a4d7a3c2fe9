"""ModelState outside the model: marks to take fed tokens back, and save/load as safetensors + JSON.

A mark is lighter than `ModelState.snapshot()`: it keeps the KDA arrays (replaced wholesale by every
step, so holding them costs no copy) but only the *length* of each MLA cache. MLA rows are append-only,
so rows [0, length) stay unchanged as long as no older mark was rewound to and fed past; `rewind`
restores the KDA arrays and cuts the MLA lengths. A mark holds no cache page, so holding many marks
neither copies a page on the next write nor keeps old pages alive.
Callers drop marks newer than the one they rewind to.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import KimiError
from .state import KDAState, MLAState, ModelState

STATE_FORMAT = "kimi-mlx-state"
STATE_VERSION = 1
META_KEY = "kimi_mlx"


@dataclass
class StateMark:
    layers: list  # per layer: a KDAState copy, or an MLA cache length (int)
    offset: int


def mark(state: ModelState) -> StateMark:
    m = StateMark([replace(s) if isinstance(s, KDAState) else s.length for s in state.layers], state.offset)
    if hasattr(state, "marked"):  # a distributed driver's state: the other ranks mark their parts too
        state.marked(m)
    return m


def rewind(state: ModelState, m: StateMark) -> None:
    """Bring state back to mark m (exact; see the module docstring for when m is still valid)."""
    for i, saved in enumerate(m.layers):
        if isinstance(saved, KDAState):
            state.layers[i] = replace(saved)
        else:
            state.layers[i].length = saved
    state.offset = m.offset
    if hasattr(state, "rewound"):
        state.rewound(m)


# decode's matrices model/fuse.py derives at load (from k_up and v_up; f_b|g_b; q_proj|kv_a_proj_with_mqa): not part
# of a model's identity (states saved before they existed still load)
DERIVED = (".q_absorb", ".v_absorb") + tuple(f".{m}.{p}" for m in ("gates_out", "q_kv")
                                              for p in ("weight", "scales", "biases"))


def model_identity(model) -> dict:
    """Config hash plus checksums of a few weights: enough to tell two models apart without reading all."""
    from mlx.utils import tree_flatten

    cfg = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    params = sorted((kv for kv in tree_flatten(model.parameters()) if not kv[0].endswith(DERIVED)), key=lambda kv: kv[0])
    picks = [params[i] for i in sorted({0, len(params) // 3, 2 * len(params) // 3, len(params) - 1})] if params else []
    h = hashlib.sha256()
    for name, a in picks:
        h.update(f"{name}:{a.shape}:{a.dtype}".encode())
        h.update(_bytes(a.reshape(-1)[:256]))
    return {"config_sha256": hashlib.sha256(cfg.encode()).hexdigest()[:16], "weights_sha256": h.hexdigest()[:16]}


def _bytes(a: mx.array) -> bytes:
    return np.array(mx.contiguous(a).view(mx.uint8)).tobytes()


def _digest(arrays: dict[str, mx.array]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(_bytes(arrays[k]))
    return h.hexdigest()


def state_layout(state: ModelState) -> dict:
    return {"offset": state.offset, "batch_size": state.batch_size,
            "layers": [{"kind": "kda"} if isinstance(s, KDAState) else {"kind": "mla", "length": s.length, "bits": s.bits}
                       for s in state.layers]}


def save_state(path: str | Path, state: ModelState, model, extra: dict) -> None:
    """Write state arrays (safetensors) with JSON metadata (format, version, model identity, extra) atomically."""
    if hasattr(model, "save_parts"):  # a distributed driver: every rank writes its own part
        return model.save_parts(path, state, extra)
    path = Path(path)
    arrays = state.arrays()
    mx.eval(list(arrays.values()))
    meta = {"format": STATE_FORMAT, "version": STATE_VERSION, "model": model_identity(model),
            "state": state_layout(state), "sha256": _digest(arrays), **extra}
    if path.parent and not path.parent.is_dir():
        raise KimiError(f"{path}: directory {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        mx.save_safetensors(tmp, arrays, metadata={META_KEY: json.dumps(meta)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state(path: str | Path, model) -> tuple[ModelState, dict]:
    """(state, metadata) from a file written by save_state for this model; any problem is one KimiError line."""
    if hasattr(model, "load_parts"):  # a distributed driver: every rank reads its own part
        return model.load_parts(path)
    path = Path(path)
    if not path.is_file():
        raise KimiError(f"{path}: no such session file")
    try:
        arrays, raw = mx.load(str(path), format="safetensors", return_metadata=True)
        meta = json.loads(raw[META_KEY])
        ok = isinstance(meta, dict) and meta.get("format") == STATE_FORMAT
    except Exception:
        ok = False
    if not ok:
        raise KimiError(f"{path}: not a kimi-mlx session file, or corrupt")
    if meta.get("version") != STATE_VERSION:
        raise KimiError(f"{path}: session format version {meta.get('version')}, this kimi-mlx reads "
                        f"version {STATE_VERSION}; start a new session")
    if meta.get("model") != model_identity(model):
        raise KimiError(f"{path}: saved with a different model (or different weights); "
                        "load it with the model it was saved with")
    try:
        digest_ok = _digest(arrays) == meta["sha256"]
        state = _build_state(model, arrays, meta["state"]) if digest_ok else None
    except Exception:
        state = None
    if state is None:
        raise KimiError(f"{path}: session file is corrupt (state arrays do not match their checksum or layout)")
    return state, meta


def _build_state(model, arrays: dict, layout: dict) -> ModelState | None:
    """The state described by layout from the saved arrays, checked against a fresh state of this model."""
    fresh = model.new_state(int(layout["batch_size"]))
    if len(layout["layers"]) != len(fresh.layers):
        return None
    layers = []
    for i, (spec, s) in enumerate(zip(layout["layers"], fresh.layers)):
        prefix = f"layers.{i}."
        sub = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
        if isinstance(s, KDAState) and spec["kind"] == "kda":
            kda = KDAState.from_arrays(sub)
            if kda.conv.shape != s.conv.shape or kda.recurrent.shape != s.recurrent.shape:
                return None
            layers.append(KDAState(kda.conv.astype(s.conv.dtype), kda.recurrent.astype(s.recurrent.dtype)))
        elif isinstance(s, MLAState) and spec["kind"] == "mla":
            mla = MLAState.from_arrays(sub) if sub else MLAState(bits=int(spec["bits"]))
            if mla.length != int(spec["length"]) or mla.bits != int(spec["bits"]):
                return None
            layers.append(mla)
        else:
            return None
    return ModelState(layers, int(layout["offset"]), int(layout["batch_size"]))
