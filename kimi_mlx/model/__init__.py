"""The Kimi Linear network in MLX: pure math, no I/O."""

from .decoder import Model

__all__ = ["Model"]
