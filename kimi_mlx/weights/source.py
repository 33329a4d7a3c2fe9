"""The source side of the converter: an HF checkpoint's tensors, checked from the safetensors headers
alone (names, shapes, dtypes, byte ranges) before anything is read, then read one group at a time.

Reading is lazy (mx.load maps nothing until an array is evaluated), so a group's tensors are the only
ones in memory, and a truncated or corrupt shard is found before any output is written.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from ..config import KDA, MOE, ModelConfig
from ..errors import WeightsError, first_line
from .layout import LAYER_RE
from .load import weight_files

ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
            "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
FLOAT_DTYPES = ("F32", "BF16", "F16")
MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


def _corrupt(f: Path, why: str) -> WeightsError:
    return WeightsError(f"{f}: truncated or corrupt safetensors file ({why}); re-download the checkpoint")


def read_header(f: Path) -> dict[str, TensorInfo]:
    """Tensor infos of one safetensors file, after checking that every byte range lies in the file."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise _corrupt(f, "no header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise _corrupt(f, f"header length {n} does not fit a {size}-byte file")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _corrupt(f, "header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(f, "header is not a JSON object")
    data = size - 8 - n
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = t["dtype"], tuple(t["shape"]), t["data_offsets"]
            expected = math.prod(shape) * ITEMSIZE[dtype]
        except (KeyError, TypeError, ValueError):
            raise _corrupt(f, f"bad header entry for '{name}'") from None
        if end - start != expected or not 0 <= start <= end:
            raise _corrupt(f, f"tensor '{name}' has {end - start} bytes for shape {list(shape)} {dtype}")
        if end > data:
            raise _corrupt(f, f"tensor '{name}' ends at byte {end} of a {data}-byte data section")
        out[name] = TensorInfo(f, dtype, shape)
    return out


def scan(path: Path) -> dict[str, TensorInfo]:
    """All tensors of a checkpoint directory (sharded or not), from the headers only."""
    out: dict[str, TensorInfo] = {}
    for f in weight_files(path):
        for name, info in read_header(f).items():
            if name in out:
                raise WeightsError(f"{path}: tensor '{name}' is in both {out[name].file.name} and {f.name}")
            out[name] = info
    return out


def _skipped(name: str, info: TensorInfo, cfg: ModelConfig) -> bool:
    """Tensors a converter drops: MTP/speculative layers, rotary buffers, empty placeholders."""
    if math.prod(info.shape) == 0 or name.startswith("model.mtp") or "rotary_emb" in name:
        return True
    m = LAYER_RE.match(name)
    return m is not None and int(m.group(1)) >= cfg.num_hidden_layers


def _layer_shapes(cfg: ModelConfig, i: int, names: set[str]) -> dict[str, tuple]:
    """Expected HF (Moonshot) tensor shapes of layer i (kimi_linear.md section 2)."""
    D, p = cfg.hidden_size, f"model.layers.{i}."
    a = p + "self_attn."
    e = {p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,)}
    if cfg.layer_types[i] == KDA:
        H, Dk, K = cfg.kda_num_heads, cfg.kda_head_dim, cfg.conv_kernel_size
        P = H * Dk
        for x in "qkv":
            e[a + f"{x}_proj.weight"], e[a + f"{x}_conv1d.weight"] = (P, D), (P, 1, K)
        e.update({a + "A_log": (1, 1, H, 1), a + "dt_bias": (P,), a + "f_a_proj.weight": (Dk, D),
                  a + "f_b_proj.weight": (P, Dk), a + "b_proj.weight": (H, D), a + "g_a_proj.weight": (Dk, D),
                  a + "g_b_proj.weight": (P, Dk), a + "o_norm.weight": (Dk,), a + "o_proj.weight": (D, P)})
    else:
        H, L, pe = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        e.update({a + "q_proj.weight": (H * cfg.qk_head_dim, D), a + "kv_a_proj_with_mqa.weight": (L + pe, D),
                  a + "kv_a_layernorm.weight": (L,), a + "kv_b_proj.weight": (H * (cfg.qk_nope_head_dim + cfg.v_head_dim), L),
                  a + "o_proj.weight": (D, H * cfg.v_head_dim)})
    m = p + "block_sparse_moe."
    if cfg.mlp_types[i] == MOE:
        E, I = cfg.num_experts, cfg.moe_intermediate_size
        e[m + "gate.weight"], e[m + "gate.e_score_correction_bias"] = (E, D), (E,)
        for x in range(E):
            e[m + f"experts.{x}.w1.weight"], e[m + f"experts.{x}.w3.weight"] = (I, D), (I, D)
            e[m + f"experts.{x}.w2.weight"] = (D, I)
        if cfg.num_shared_experts:
            S = I * cfg.num_shared_experts
            e.update({m + "shared_experts.gate_proj.weight": (S, D), m + "shared_experts.up_proj.weight": (S, D),
                      m + "shared_experts.down_proj.weight": (D, S)})
    else:
        F = cfg.intermediate_size
        d = m if m + "gate_proj.weight" in names else p + "mlp."  # transformers writes the dense MLP under m
        e.update({d + "gate_proj.weight": (F, D), d + "up_proj.weight": (F, D), d + "down_proj.weight": (D, F)})
    return e


def expected_shapes(cfg: ModelConfig, names: set[str]) -> dict[str, tuple]:
    D, V = cfg.hidden_size, cfg.vocab_size
    e = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        e["lm_head.weight"] = (V, D)
    for i in range(cfg.num_hidden_layers):
        e.update(_layer_shapes(cfg, i, names))
    return e


def check_source(cfg: ModelConfig, tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """The tensors to convert, after checking names, shapes and dtypes against config.json."""
    used = {n: t for n, t in tensors.items() if not _skipped(n, t, cfg)}
    if any(n.endswith(".scales") or ".qkv_proj." in n or ".switch_mlp." in n for n in used):
        raise WeightsError("SRC is already converted (MLX layout or quantized); convert from the original HF "
                           "checkpoint, or load this one directly")
    expected = expected_shapes(cfg, set(used))
    missing = [n for n in expected if n not in used]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"checkpoint is missing tensor '{missing[0]}'{more}; the checkpoint is incomplete")
    extra = [n for n in used if n not in expected]
    if extra:
        raise WeightsError(f"checkpoint has unexpected tensor '{extra[0]}'; it is not a Kimi Linear HF checkpoint "
                           f"matching config.json")
    for n, shape in expected.items():
        got = used[n].shape
        loose = n.endswith(("A_log", "dt_bias"))  # only the element count matters (reshaped on conversion)
        if (math.prod(got) != math.prod(shape)) if loose else (got != shape):
            raise WeightsError(f"tensor '{n}' has shape {list(got)}, config.json implies {list(shape)}")
        if used[n].dtype not in FLOAT_DTYPES:
            raise WeightsError(f"tensor '{n}' has dtype {used[n].dtype}; the converter reads F32, BF16 or F16")
    return used


def groups(cfg: ModelConfig, tensors: dict[str, TensorInfo]) -> list[tuple[str, list[str]]]:
    """Conversion order: ('embed', names), ('layer i', names) per layer, ('head', names)."""
    by_layer: dict[int, list[str]] = {i: [] for i in range(cfg.num_hidden_layers)}
    top = []
    for n in tensors:
        m = LAYER_RE.match(n)
        (by_layer[int(m.group(1))] if m else top).append(n)
    out = [("embed", ["model.embed_tokens.weight"])]
    out += [(f"layer {i}", names) for i, names in by_layer.items()]
    out.append(("head", [n for n in top if n != "model.embed_tokens.weight"]))
    return out


class SourceReader:
    """Reads tensors lazily, file by file; each tensor is handed out once, so nothing stays cached."""

    def __init__(self, tensors: dict[str, TensorInfo]):
        self.tensors = tensors
        self.files: dict[Path, dict] = {}

    def take(self, names: list[str]) -> dict[str, mx.array]:
        out = {}
        for n in names:
            f = self.tensors[n].file
            if f not in self.files:
                try:
                    self.files[f] = mx.load(str(f))
                except Exception as e:  # mlx raises plain RuntimeError/ValueError on bad files
                    raise _corrupt(f, first_line(e))
            out[n] = self.files[f].pop(n)
        return out
