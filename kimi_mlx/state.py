"""Per-sequence model state: KDA conv tails and recurrent matrices, MLA latent caches.

Layouts (B = batch):
  KDAState.conv       [B, K-1, 3*H*D]   last K-1 pre-conv inputs of q|k|v, model dtype
  KDAState.recurrent  [B, H, Dv, Dk]    float32 (the transpose of fla's [B, H, Dk, Dv])
  MLAState.cache      [B, capacity, kv_lora_rank + qk_rope_head_dim]  normed latent | k_pe
  MLAState.length     number of valid cached tokens (rows [0, length) of cache)

Arrays are immutable values, so a snapshot is a shallow copy: O(1), exact, and later writes
never change it (MLX copies a buffer on write when a snapshot still holds it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import mlx.core as mx

from .config import KDA, ModelConfig

MLA_CACHE_STEP = 256


@dataclass
class KDAState:
    conv: mx.array
    recurrent: mx.array

    def arrays(self) -> dict[str, mx.array]:
        return {"conv": self.conv, "recurrent": self.recurrent}


@dataclass
class MLAState:
    cache: mx.array | None = None
    length: int = 0

    def append(self, new: mx.array) -> mx.array:
        """Append [B, T, W] rows; returns the valid cache [B, length, W]."""
        B, T, W = new.shape
        end = self.length + T
        if self.cache is None or end > self.cache.shape[1]:
            cap = ((end + MLA_CACHE_STEP - 1) // MLA_CACHE_STEP) * MLA_CACHE_STEP
            grown = mx.zeros((B, cap, W), dtype=new.dtype)
            if self.length:
                grown = _write(grown, self.cache[:, : self.length], 0)
            self.cache = grown
        # never __setitem__: it would mutate an array a snapshot still shares
        self.cache = _write(self.cache, new.astype(self.cache.dtype), self.length)
        self.length = end
        return self.cache[:, :end]

    def arrays(self) -> dict[str, mx.array]:
        if self.cache is None:
            return {}
        return {"cache": self.cache[:, : self.length]}


def _write(buf: mx.array, rows: mx.array, start: int) -> mx.array:
    return mx.slice_update(buf, rows, mx.array([0, start, 0]), axes=(0, 1, 2))


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
        out = {}
        for i, s in enumerate(self.layers):
            for k, v in s.arrays().items():
                out[f"layers.{i}.{k}"] = v
        return out

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays().values())

    def eval(self) -> None:
        mx.eval(list(self.arrays().values()))


def new_state(cfg: ModelConfig, batch_size: int = 1, dtype: mx.Dtype = mx.float32) -> ModelState:
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
            layers.append(MLAState())
    return ModelState(layers, 0, batch_size)
