"""Checkpoint I/O: reading HF and converted checkpoints, mapping names to this project's layout."""

from .load import load_model, read_checkpoint

__all__ = ["load_model", "read_checkpoint"]
