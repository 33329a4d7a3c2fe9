"""kimi-mlx: Kimi Linear on MLX."""

import os
import sys

# MLX's CUDA backend cuts its command stream into CUDA graphs of at most this many ops (100 by default on
# H100/H200/B200 cards, 20 on others), read once at the device's first use. 20 measured faster on an H200 for
# both paced prefill (8k: 8.2k vs 7.8-8.0k tok/s) and decode (RESULTS.md, twelfth session). It also cuts a graph
# once its kernels' inputs pass MLX_MAX_MB_PER_BUFFER million elements (1,000 on an H200): a decode token at a
# 131,072-row MLA page passes that (each page is an input of 75.5M elements, twice a layer), and the extra cut
# cost 12-15% of the token (220 vs 256 tok/s on an H200, RESULTS.md, seventeenth session), so the ops limit
# alone cuts graphs here. Metal keeps its own per-chip defaults; either limit set by the user wins.
CUDA_GRAPH_LIMITS = {"MLX_MAX_OPS_PER_BUFFER": "20", "MLX_MAX_MB_PER_BUFFER": "1000000"}
if sys.platform != "darwin":
    for _k, _v in CUDA_GRAPH_LIMITS.items():
        os.environ.setdefault(_k, _v)

from .errors import KimiError
from .generate import GenerationOptions, Response, generate, stream_generate
from .loading import load
from .session import ChatSession
from .weights.load import load_model

__version__ = "0.1.0"
__all__ = ["ChatSession", "GenerationOptions", "KimiError", "Response", "generate", "load", "load_model",
           "stream_generate", "__version__"]
