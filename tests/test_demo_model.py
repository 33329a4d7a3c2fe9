"""The packaged trained demo: loads offline from the package, held-out perplexity under a recorded bound,
state carried across chunks is worth something, and greedy output for a fixed prompt stays put."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import kimi_mlx
from kimi_mlx.demo import PACKAGED
from kimi_mlx.generate import stream_generate
from kimi_mlx.loading import resolve

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tools"))
import perplexity  # noqa: E402
from build_corpus import conversations, function_pairs  # noqa: E402

SAMPLE_TOKENS = 2048  # of heldout_sample.txt (CPython's Lib/cmd.py, a held-out file)
PPL_RECORDED = 48.828  # full context, packaged 8-bit demo, MLX CPU (2026-11-27)
PPL_BOUND = PPL_RECORDED * 1.02  # float noise moves it by ~1e-5; a broken load, recipe or state moves it by far more
PROMPT = [{"role": "user", "content": 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""'}]
GREEDY = [258, 321, 304, 367, 374, 472, 111, 263, 95, 280, 331, 590, 862, 259, 345, 304, 367, 374, 472, 111, 263,
          95, 280, 331]  # recorded 2026-11-27
TIE = 0.05  # logits closer than this are a float-noise tie: either token is a correct greedy pick


@pytest.fixture(scope="module")
def demo():
    return kimi_mlx.load("demo")


@pytest.fixture(scope="module")
def sample(demo):
    _, tok = demo
    return tok.encode((PACKAGED / "heldout_sample.txt").read_text())[: SAMPLE_TOKENS + 1]


def test_packaged_demo_loads_offline(demo):
    model, tok = demo
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert resolve("demo") == PACKAGED and PACKAGED.parent == Path(kimi_mlx.__file__).parent
    cache = Path(os.environ["KIMI_MLX_CACHE"])
    assert not any(p.name.startswith("demo-v") for p in cache.glob("*")), "the trained demo is never written out"
    size = sum(f.stat().st_size for f in PACKAGED.glob("*.safetensors"))
    assert size <= 8e6
    cfg = model.config
    assert cfg.layer_types == ["kda", "kda", "kda", "mla"] * 2 and cfg.num_experts == 8
    assert tok.n_ranks == 4096 and tok.vocab_size == cfg.vocab_size == 4096 + 256
    assert (tok.bos_id, tok.im_end_id) == (4096, 4098) and tok.special["<|im_middle|>"] == 4096 + 17
    assert tok.chat_template and "<|im_assistant|>assistant<|im_middle|>" in tok.apply_chat_template(PROMPT)


def test_random_demo_stays_available():
    model = kimi_mlx.load_model("demo-random")
    assert model.config.vocab_size == 512 and model.config.num_experts == 16


def test_heldout_perplexity_under_bound(demo, sample):
    model, tok = demo
    ppl = perplexity.score(model, tok, sample).ppl
    assert ppl < PPL_BOUND, f"held-out perplexity {ppl:.3f} >= bound {PPL_BOUND:.3f} (recorded {PPL_RECORDED})"
    assert ppl > PPL_RECORDED * 0.98, f"held-out perplexity {ppl:.3f} moved well below {PPL_RECORDED}: re-record"


def test_carried_state_beats_independent_windows(demo, sample):
    model, tok = demo
    full = perplexity.score(model, tok, sample[:1025], chunk=128)
    windows = perplexity.score(model, tok, sample[:1025], chunk=128, window=64)
    assert full.tokens == windows.tokens
    assert full.ppl < 0.9 * windows.ppl


def test_greedy_output_is_stable(demo):
    """The recorded greedy reply, up to float-noise ties (where the rest may then differ)."""
    model, tok = demo
    got = [r.token for r in stream_generate(model, tok, PROMPT, max_tokens=len(GREEDY), temperature=0)]
    prompt = tok.apply_chat_template(PROMPT, tokenize=True)
    logits = np.array(model(mx.array([prompt + GREEDY[:-1]]))[0, len(prompt) - 1 :].astype(mx.float32))
    for i, want in enumerate(GREEDY):  # the recorded path is greedy under teacher forcing
        assert logits[i, want] >= logits[i].max() - TIE, f"step {i}: recorded token is no longer the greedy pick"
    for i, (a, b) in enumerate(zip(got, GREEDY)):
        if a != b:
            assert abs(logits[i, a] - logits[i, b]) < TIE, f"step {i}: generated {a}, recorded {b}, not a tie"
            break
    else:
        assert len(got) == len(GREEDY)
    assert tok.decode(GREEDY).startswith("    if self.")


def test_sessions_after_save_load_and_undo_score_like_a_fresh_state(demo):
    """Held-out turns from the sample file through ChatSession; the next reference reply scores the same from the
    session, after save/load, after an undone turn, and from a fresh state fed the same tokens."""
    model, tok = demo
    convs = conversations(function_pairs((PACKAGED / "heldout_sample.txt").read_text()), per=5)
    out = perplexity.session_table(model, tok, convs, n=1, max_tokens=8)
    assert out.pop("same_tokens")
    nll = [v["nll"] / v["tokens"] for v in out.values()]
    assert max(nll) - min(nll) < 1e-4, out
