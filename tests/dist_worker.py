"""Run under `mlx.launch --backend ring -n 2`: pipeline-parallel logits, greedy tokens and a continued
session on a checkpoint; each rank writes its results to OUT/rank<r>.npz (tests/test_distributed.py)."""

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from kimi_mlx import load_model


def main(ckpt: str, out: str, mode: str):
    if mode == "unreachable":
        from kimi_mlx import distributed

        distributed.INIT_TIMEOUT_S = 3
    model = load_model(ckpt, distributed=True)
    p = model.pipeline
    rank = p.rank
    if mode == "die" and rank == 1:
        model(mx.array([[1, 2, 3]]), model.new_state())
        raise SystemExit(7)
    toks = mx.array(np.arange(40)[None] % 97 + 3)
    logits = model(toks)
    state = model.new_state()
    model(toks[:, :25], state)
    snap = state.snapshot()
    greedy = []
    last = model(toks[:, 25:], state)[:, -1]
    for _ in range(8):
        t = int(mx.argmax(last, axis=-1).item())
        greedy.append(t)
        last = model(mx.array([[t]]), state)[:, -1]
    state.restore(snap)
    again = model(toks[:, 25:], state)[:, -1]
    if mode == "die":  # rank 0 keeps calling; rank 1 is gone
        for _ in range(100):
            model(mx.array([[1]]), state)
    weight_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    np.savez(Path(out) / f"rank{rank}.npz", logits=np.array(logits), greedy=np.array(greedy),
             again=np.array(again), weight_bytes=weight_bytes, layers=np.array(list(model.owned)))


if __name__ == "__main__":
    from kimi_mlx.errors import KimiError

    try:
        main(*sys.argv[1:])
    except KimiError as e:  # as the CLI does: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
