import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# float32 comparisons against the references need float32 matmuls: MLX's CUDA backend runs them in TF32
# unless told not to (with TF32 the GPU tests miss their 1e-4 bounds by design, ~1e-3; doctor allows it)
os.environ.setdefault("MLX_ENABLE_TF32", "0")
# speculation's tests check its mechanism (rounds, rollback, exactness), so prompt lookup drafts its full width
# in them; on a CPU the cost-aware width (auto) would draft almost never. test_speculative tests auto itself.
os.environ.setdefault("KIMI_MLX_DRAFT_WIDTH", "max")


@pytest.fixture(scope="session", autouse=True)
def _demo_cache(tmp_path_factory):
    """Keep the demo checkpoint out of the user's home directory."""
    if "KIMI_MLX_CACHE" not in os.environ:
        os.environ["KIMI_MLX_CACHE"] = str(tmp_path_factory.mktemp("kimi_cache"))
    yield


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Factory: (torch model, checkpoint dir) for a tiny HF config, cached per argument set."""
    import hf_oracle

    made = {}

    def make(layers="kkkm", seed=0, extreme_gates=False, **over):
        key = (layers, seed, extreme_gates, tuple(sorted(over.items())))
        if key not in made:
            cfg = hf_oracle.make_config(layers, **over)
            model = hf_oracle.make_model(cfg, seed=seed, extreme_gates=extreme_gates)
            path = tmp_path_factory.mktemp("hf")
            hf_oracle.save(model, path)
            made[key] = (model, path)
        return made[key]

    return make


@pytest.fixture(scope="session")
def demo_random():
    """(model, tokenizer) of the random-weight demo (byte-level vocabulary)."""
    import kimi_mlx

    return kimi_mlx.load("demo-random")


def fresh_logprobs(model, tokens):
    """Log-probabilities of the next token after a fresh prefill of `tokens` (numpy, float32)."""
    import mlx.core as mx
    import numpy as np

    logits = model(mx.array([tokens]))[0, -1].astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits))
