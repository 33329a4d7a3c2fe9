"""Resolve a model argument (directory, hub repo id, or 'demo') and load model + tokenizer."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import KimiError, first_line


def resolve(model: str, revision: str | None = None) -> Path:
    """A local checkpoint directory for `model`: 'demo', a path, or a hub repo id (downloaded)."""
    from .demo import DEMO_NAMES, demo_dir

    if model in DEMO_NAMES:
        return demo_dir(model)
    p = Path(model).expanduser()
    if p.exists():
        return p
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise KimiError(f"{model}: no such directory; give a checkpoint directory, a hub repo id or 'demo'")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision))
    except Exception as e:  # network, auth, missing repo: all one line for the user
        msg = first_line(e)
        raise KimiError(f"{model}: not a local directory and the hub download failed ({msg})") from None


def _mlx_temp_dir() -> Path:
    """std::filesystem::temp_directory_path() / "mlx" / <MLX version>: temp_directory_path is the first of $TMPDIR,
    $TMP, $TEMP, $TEMPDIR that is set, else /tmp."""
    import mlx.core as mx

    tmp = next((os.environ[k] for k in ("TMPDIR", "TMP", "TEMP", "TEMPDIR") if os.environ.get(k)), "/tmp")
    return Path(tmp) / "mlx" / mx.__version__


def mlx_cpu_kernel_dir() -> Path:
    """Where MLX's CPU backend keeps the kernels it compiles (its temp directory's "cpu"). MLX builds each fused
    (mx.compile) CPU kernel there with the system C++ compiler the first time it meets it and loads the built
    library from there ever after, across processes."""
    return _mlx_temp_dir() / "cpu"


def mlx_cuda_kernel_dir() -> Path:
    """Where MLX's CUDA backend keeps the PTX of the kernels it compiles with NVRTC (its own, the fused
    mx.compile graphs and custom kernels such as this project's): $MLX_PTX_CACHE_DIR, else its temp directory's
    "ptx". A kernel met for the first time is compiled and its PTX written there; later processes read it back."""
    return Path(os.environ["MLX_PTX_CACHE_DIR"]) if os.environ.get("MLX_PTX_CACHE_DIR") else _mlx_temp_dir() / "ptx"


# backend -> (the kernel cache directory, the suffix of a compiled kernel there, what the first run costs)
_CACHES = {"cpu": (mlx_cpu_kernel_dir, (".so", ".dylib", ".dll"), "its CPU kernels", "about half a minute"),
           "cuda": (mlx_cuda_kernel_dir, (".ptx",), "its CUDA kernels", "minutes for the full model")}

_told_cold = False


def _backend() -> str | None:
    import mlx.core as mx

    if mx.default_device() == mx.cpu:
        return "cpu"
    return "cuda" if mx.cuda.is_available() else None  # Metal compiles its kernels in moments: nothing to say


def _holds_compiled(cache: Path, suffixes: tuple[str, ...]) -> bool:
    """Whether the cache holds any compiled kernel (stops at the first: a warm cache holds thousands)."""
    if not cache.is_dir():
        return False
    return any(f.suffix in suffixes for f in cache.rglob("*"))


def tell_if_cold_cache(backend: str | None = None) -> bool:
    """On the CPU and on CUDA, say once on stderr (before the wait, not after) that this run compiles MLX's kernels
    when their cache holds none yet: a first run otherwise sits silent for half a minute (the CPU) or minutes (a
    full-size model on CUDA: every kernel through NVRTC). True if it told. backend: 'cpu' or 'cuda' (tests),
    default this process's."""
    global _told_cold
    import mlx.core as mx

    from .distributed import launch_rank

    backend = backend or _backend()
    if _told_cold or backend not in _CACHES or launch_rank() != 0:
        return False
    where, suffixes, what, cost = _CACHES[backend]
    cache = where()
    if _holds_compiled(cache, suffixes):
        return False
    _told_cold = True
    print(f"first run of MLX {mx.__version__} here: compiling {what} into {cache} "
          f"({cost}, once; later runs reuse them)", file=sys.stderr, flush=True)
    return True


def load(model: str, revision: str | None = None, distributed: bool = False, experts_memory_gb: float | None = None):
    """(model, tokenizer) from a directory, hub repo id or 'demo'.

    experts_memory_gb: stream the routed experts from disk into this many GB of memory (load_model's; docs/offload.md).

    distributed: split the layers over the ranks started by mlx.launch (docs/distributed.md). Rank 0
    gets a model that runs every call on all ranks; the other ranks serve rank 0 inside this call and
    exit when rank 0's program ends, so the code after it runs on rank 0 only.
    """
    from .distributed import launched
    from .tokenizer import Tokenizer
    from .weights.load import load_model
    path = resolve(model, revision)
    tell_if_cold_cache()  # after the path checks: a mistyped model is one line, with nothing to compile
    if distributed:
        if experts_memory_gb is not None:
            raise KimiError("experts memory with --distributed is not supported; give one or the other")
        from .distributed_driver import start

        tokenizer = Tokenizer(path)
        return start(path), tokenizer
    if launched():
        raise KimiError("started by a distributed launcher (MLX_RANK is set) without --distributed "
                        "(distributed=True in Python): every rank would load the whole model; add it")
    return load_model(path, experts_memory_gb=experts_memory_gb), Tokenizer(path)
