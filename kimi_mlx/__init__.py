"""kimi-mlx: Kimi Linear on MLX."""

from .errors import KimiError
from .generate import GenerationOptions, Response, generate, stream_generate
from .loading import load
from .session import ChatSession
from .weights.load import load_model

__version__ = "0.1.0"
__all__ = ["ChatSession", "GenerationOptions", "KimiError", "Response", "generate", "load", "load_model",
           "stream_generate", "__version__"]
