"""kimi-mlx: Kimi Linear on MLX."""

import os
import sys

# MLX's CUDA backend cuts its command stream into CUDA graphs of at most this many ops (100 by default on
# H100/H200/B200 cards, 20 on others), read once at the device's first use. 20 measured faster on an H200 for
# both paced prefill (8k: 8.2k vs 7.8-8.0k tok/s) and decode (RESULTS.md, twelfth session). Metal keeps its own
# per-chip defaults; MLX_MAX_OPS_PER_BUFFER set by the user wins.
if sys.platform != "darwin":
    os.environ.setdefault("MLX_MAX_OPS_PER_BUFFER", "20")

from .errors import KimiError
from .generate import GenerationOptions, Response, generate, stream_generate
from .loading import load
from .session import ChatSession
from .weights.load import load_model

__version__ = "0.1.0"
__all__ = ["ChatSession", "GenerationOptions", "KimiError", "Response", "generate", "load", "load_model",
           "stream_generate", "__version__"]
