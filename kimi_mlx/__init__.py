"""kimi-mlx: Kimi Linear on MLX."""

import os
import sys

# MLX's CUDA backend cuts its command stream into CUDA graphs of at most this many ops (100 by default on
# data-center cards, 20 on others), read once at the device's first use: shorter graphs start running sooner,
# so the device works while the host records the rest (20 measured faster for paced prefill and decode,
# RESULTS.md). It also cuts a graph once its kernels' inputs pass MLX_MAX_MB_PER_BUFFER million elements: a
# decode token at a 131,072-row MLA page passes the default (each page is an input of 75.5M elements, twice a
# layer), and each extra cut costs the token a graph launch, so the ops limit alone cuts graphs here. Metal keeps
# its own per-chip defaults; either limit set by the user wins.
CUDA_GRAPH_LIMITS = {"MLX_MAX_OPS_PER_BUFFER": "20", "MLX_MAX_MB_PER_BUFFER": "1000000"}
if sys.platform != "darwin":
    for _k, _v in CUDA_GRAPH_LIMITS.items():
        os.environ.setdefault(_k, _v)

from .batch import BatchGenerator, batch_generate, stream_batch
from .errors import KimiError
from .generate import GenerationOptions, Response, generate, stream_generate
from .loading import load
from .session import ChatSession
from .weights.load import load_model

__version__ = "0.1.0"
__all__ = ["BatchGenerator", "ChatSession", "GenerationOptions", "KimiError", "Response", "batch_generate", "generate",
           "load", "load_model", "stream_batch", "stream_generate", "__version__"]
