"""Read a checkpoint directory (HF layout or this project's converted layout) into a Model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..config import ModelConfig
from ..errors import WeightsError, first_line
from ..model import Model
from ..model.fuse import fuse_model
from .expert_files import expert_tensor
from .layout import hf_to_local, is_hf_layout
from .mlx_lm_layout import is_mlx_lm_layout, mlx_lm_to_local


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise WeightsError(f"{index}: corrupt index file; re-download or re-convert the checkpoint") from None
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise WeightsError(f"{path}: shard {missing[0]} listed in the index is missing; the download is incomplete")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{path}: no *.safetensors weight files found")
    return files


def read_checkpoint(path: Path) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for f in weight_files(path):
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:  # mlx raises plain RuntimeError/ValueError on bad files
            raise WeightsError(f"{f}: unreadable safetensors file ({first_line(e)}); it is truncated or "
                               "corrupt") from None
    return weights


def _quantize(model: Model, cfg: ModelConfig, weights) -> None:
    q = cfg.quantization
    if not q:
        return

    def predicate(path: str, module: nn.Module):
        if f"{path}.scales" not in weights:
            return False
        spec = q.get(path)
        if isinstance(spec, dict):
            return {"group_size": spec["group_size"], "bits": spec["bits"], "mode": spec.get("mode", "affine")}
        return True

    nn.quantize(model, group_size=q.get("group_size", 64), bits=q.get("bits", 4), mode=q.get("mode", "affine"),
                class_predicate=predicate)


def check_and_load(model: Model, weights: dict, skip=None) -> None:
    """Load `weights` into `model`, every parameter accounted for; skip(name): parameters left out (the routed
    experts a streaming load reads later)."""
    expected = {k: v for k, v in tree_flatten(model.parameters()) if skip is None or not skip(k)}
    missing = sorted(set(expected) - set(weights))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"checkpoint is missing tensor '{missing[0]}'{more}; the checkpoint is incomplete")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise WeightsError(f"checkpoint has unexpected tensor '{extra[0]}'; it does not match config.json")
    for name, arr in weights.items():
        if arr.shape != expected[name].shape:
            raise WeightsError(
                f"tensor '{name}' has shape {tuple(arr.shape)}, config.json implies {tuple(expected[name].shape)}"
            )
    model.load_weights(list(weights.items()), strict=False)


def load_model(path: str | Path, dtype: mx.Dtype | None = None, fuse: bool = True, distributed: bool = False,
               experts_memory_gb: float | None = None) -> Model:
    """Load a Kimi Linear checkpoint directory: HF layout (sharded safetensors, bf16/f16/f32) or converted.

    dtype: cast floating weights to this dtype (None keeps the file's dtypes).
    fuse: merge matmuls for speed (model/fuse.py); False keeps the reference module structure.
    distributed: split the layers over the ranks of mx.distributed (kimi_mlx/distributed.py); each
        rank reads only its own tensors. A single-rank run loads the whole model as usual.
    experts_memory_gb: keep the routed experts on disk and hold at most this many GB (1e9 bytes) of them in
        memory, read as tokens need them (model/offload.py; docs/offload.md). A budget that holds them all loads
        the model resident; one below a token's experts is a one-line error naming the minimum.
    """
    from ..demo import DEMO_NAMES, demo_dir as demo_model_dir

    if str(path) in DEMO_NAMES:
        path = demo_model_dir(str(path))
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: no such directory; give a checkpoint directory, a hub repo id or 'demo'")
    if not path.is_dir():
        raise WeightsError(f"{path}: not a directory; give the checkpoint directory that holds config.json")
    cfg = ModelConfig.from_file(path)
    offload = None
    if experts_memory_gb is not None:
        offload = _offload(path, experts_memory_gb, dtype, fuse, distributed)
    pipeline = None
    if distributed:
        from ..distributed import setup

        pipeline = setup(path, cfg.num_hidden_layers)
    weights = read_checkpoint(path)
    if is_mlx_lm_layout(weights):
        weights, cfg = mlx_lm_to_local(cfg, weights)
    elif is_hf_layout(weights):
        weights = hf_to_local(cfg, weights)
    return build_model(cfg, weights, dtype, fuse, pipeline, offload)


def _offload(path: Path, gb, dtype, fuse: bool, distributed: bool):
    from ..errors import ConfigError
    from ..model.offload import Offload
    from .expert_files import ExpertFiles

    try:
        gb = float(gb)
    except (TypeError, ValueError):
        raise ConfigError(f"experts memory {gb!r}: give a number of GB, e.g. 4") from None
    if not gb > 0:
        raise ConfigError(f"experts memory {gb:g} GB: give a positive number of GB, e.g. 4")
    if distributed:
        raise ConfigError("experts memory with --distributed is not supported; give one or the other")
    if not fuse:
        raise ConfigError("experts memory needs the fused model (fuse=True)")
    files = ExpertFiles(weight_files(path))
    files.open()
    return Offload(files, int(gb * 1e9), dtype)


def _owned_by(model: Model, name: str) -> bool:
    """Whether tensor `name` lives on this rank (always, without a pipeline)."""
    if name.startswith("model.layers."):
        return int(name.split(".")[2]) in model.owned
    if name.startswith("model.embed_tokens."):
        return "embed_tokens" in model.model
    return "norm" in model.model  # final norm and lm_head: the last rank


def build_model(cfg: ModelConfig, weights: dict, dtype: mx.Dtype | None = None, fuse: bool = True,
                pipeline=None, offload=None) -> Model:
    model = Model(cfg, pipeline)
    if pipeline is not None:  # tensors of other ranks are never read: mx.load is lazy
        weights = {k: v for k, v in weights.items() if _owned_by(model, k)}
    _quantize(model, cfg, weights)
    if offload is not None and not offload.plan(model):
        offload = None  # the budget holds every expert: resident, the plain path
    skip = None
    if offload is not None:  # the routed experts stay on disk: their (lazily loaded) tensors are never evaluated
        weights = {k: v for k, v in weights.items() if not expert_tensor(k)}
        skip = expert_tensor
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and not keep_fp32(k) else v
                   for k, v in weights.items()}
    check_and_load(model, weights, skip)
    del weights
    model.offload = offload.stats if offload is not None else None
    if fuse:
        fuse_model(model, offload)
    mx.eval(model.parameters())
    model.eval()
    check_kernels(model)
    if model.offload is not None:  # the kernel probe's reads are no reply's
        model.offload.reset()
    return model


def check_kernels(model: Model) -> None:
    """On a GPU: every kernel the model launches is built and run once (Model.probe_kernels); one that fails is
    switched off and its paths fall back to the next one down, said in one line on stderr."""
    for message in model.probe_kernels():
        print(f"kimi-mlx: a GPU kernel failed to build or run here and is off, its path falling back to the next "
              f"one down (slower; `kimi-mlx doctor` checks every kernel): {message}", file=sys.stderr)


FP32_SUFFIXES = ("A_log", "dt_bias", "e_score_correction_bias", "conv_weight")


def keep_fp32(name: str) -> bool:
    """Small, numerically sensitive tensors that never get down-cast."""
    return name.endswith(FP32_SUFFIXES)
