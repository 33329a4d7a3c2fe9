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


def mlx_cpu_kernel_dir() -> Path:
    """Where MLX's CPU backend keeps the kernels it compiles: std::filesystem::temp_directory_path() / "mlx" /
    <MLX version> / "cpu", and temp_directory_path is the first of $TMPDIR, $TMP, $TEMP, $TEMPDIR that is set,
    else /tmp. MLX builds each fused (mx.compile) CPU kernel there with the system C++ compiler the first time
    it meets it and loads the built library from there ever after, across processes."""
    import mlx.core as mx

    tmp = next((os.environ[k] for k in ("TMPDIR", "TMP", "TEMP", "TEMPDIR") if os.environ.get(k)), "/tmp")
    return Path(tmp) / "mlx" / mx.__version__ / "cpu"


_told_cold = False


def tell_if_cold_cache() -> bool:
    """On the CPU, say once on stderr (before the wait, not after) that this run compiles MLX's kernels when
    their cache holds none yet: a first run otherwise sits silent for half a minute or more. True if it told."""
    global _told_cold
    import mlx.core as mx

    from .distributed import launch_rank

    if _told_cold or mx.default_device() != mx.cpu or launch_rank() != 0:
        return False
    cache = mlx_cpu_kernel_dir()
    if cache.is_dir() and any(f.suffix in (".so", ".dylib", ".dll") for f in cache.iterdir()):
        return False
    _told_cold = True
    print(f"first run of MLX {mx.__version__} here: compiling its CPU kernels into {cache} "
          "(about half a minute, once; later runs reuse them)", file=sys.stderr, flush=True)
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
