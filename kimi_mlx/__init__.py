"""kimi-mlx: Kimi Linear on MLX."""

from .errors import KimiError
from .loading import load
from .weights.load import load_model

__version__ = "0.1.0"
__all__ = ["KimiError", "load", "load_model", "__version__"]
