"""Token generation over a model state."""

from __future__ import annotations

import mlx.core as mx


def greedy_tokens(model, prompt: list[int], max_tokens: int, stop_ids=()):
    """Yield greedy token ids after feeding prompt (minimal generator; sampling lives in sample.py)."""
    state = model.new_state(1)
    logits = model(mx.array([prompt]), state)[:, -1]
    for _ in range(max_tokens):
        tok = int(mx.argmax(logits, axis=-1).item())
        yield tok
        if tok in stop_ids:
            return
        logits = model(mx.array([[tok]]), state)[:, -1]
