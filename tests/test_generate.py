"""Generation on the demo model against fresh full forwards; stop strings, stop tokens, seeds, options."""

import importlib

import mlx.core as mx
import numpy as np
import pytest
from conftest import fresh_logprobs

from kimi_mlx.errors import KimiError
from kimi_mlx.generate import GenerationOptions, StopMatcher, generate, stream_generate
from kimi_mlx.state_io import mark, rewind

ATOL = 1e-4


@pytest.fixture(scope="module")
def demo(demo_random):
    return demo_random


@pytest.mark.parametrize("prefill_step_size", [2048, 5])
def test_greedy_equals_argmax_chain_of_full_forwards(demo, prefill_step_size):
    model, tok = demo
    prompt = tok.encode("The quick brown fox")
    rs = list(stream_generate(model, tok, prompt, max_tokens=24, temperature=0.0,
                              prefill_step_size=prefill_step_size, logprobs=True))
    tokens = list(prompt)
    for r in rs:
        ref = fresh_logprobs(model, tokens)
        np.testing.assert_allclose(np.array(r.logprobs), ref, atol=ATOL)
        assert r.token == int(np.argmax(ref))
        assert r.logprob == pytest.approx(float(ref[r.token]), abs=ATOL)
        tokens.append(r.token)
    assert rs[-1].finish_reason in ("length", "stop") and all(r.finish_reason is None for r in rs[:-1])


def test_prefill_progress_is_reported_in_chunks(demo):
    model, tok = demo
    prompt = tok.encode("x" * 23)
    seen = []
    list(stream_generate(model, tok, prompt, max_tokens=1, temperature=0, prefill_step_size=5,
                         progress=lambda done, total: seen.append((done, total))))
    assert seen == [(5, 23), (10, 23), (15, 23), (20, 23), (22, 23), (23, 23)]


def test_auto_prefill_steps_are_wide_on_a_gpu_only_for_prompts_ending_short(monkeypatch):
    """prefill_step_size 0 (the default): WIDE_STEP-token steps on a GPU where the prompt ends within WIDE_UNTIL
    tokens of context, else PREFILL_STEP throughout (and always on the CPU); a step size given is taken as is;
    the lengths cover the tokens."""
    g = importlib.import_module("kimi_mlx.feed")
    assert GenerationOptions().prefill_step_size == 0 and g.WIDE_STEP > g.PREFILL_STEP
    cpu = g.step_lengths(0, 9000)
    assert cpu == [g.PREFILL_STEP] * 4 + [9000 - 4 * g.PREFILL_STEP]
    assert g.step_lengths(100, 12, 5) == [5, 5, 2]
    with pytest.raises(KimiError, match="prefill step of -1 tokens"):
        g.step_lengths(0, 12, -1)
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    assert g.step_lengths(0, 9000) == [g.WIDE_STEP, g.WIDE_STEP, 9000 - 2 * g.WIDE_STEP]
    assert g.step_lengths(0, g.WIDE_UNTIL) == [g.WIDE_STEP] * (g.WIDE_UNTIL // g.WIDE_STEP)
    assert set(g.step_lengths(0, g.WIDE_UNTIL + 1)[:-1]) == {g.PREFILL_STEP}  # a long prompt: small steps throughout
    assert set(g.step_lengths(g.WIDE_UNTIL - 100, 5000)[:-1]) == {g.PREFILL_STEP}  # the context counts
    assert "else" in g.describe_steps() and g.describe_steps(512) == "512 tokens"


def test_prefill_steps_follow_the_plan_for_the_states_context(demo, monkeypatch):
    """feed.prefill steps as step_length says for the tokens the state already holds (state.offset)."""
    g = importlib.import_module("kimi_mlx.feed")
    model, tok = demo
    asked = []
    monkeypatch.setattr(g, "step_length",
                        lambda context, n, step_size=0, streamed=False: asked.append((context, n)) or 8)
    seen = []
    state = model.new_state(1)
    g.prefill(model, state, list(range(1, 13)), 0, progress=lambda done, total: seen.append(done))
    g.prefill(model, state, list(range(1, 11)), 0, progress=lambda done, total: seen.append(done))
    assert asked == [(0, 12), (12, 10)] and seen == [8, 12, 8, 10] and state.offset == 22


def test_messages_go_through_the_chat_template(demo):
    model, tok = demo
    msgs = [{"role": "user", "content": "hi"}]
    a = list(stream_generate(model, tok, msgs, max_tokens=3, temperature=0))
    b = list(stream_generate(model, tok, tok.apply_chat_template(msgs, tokenize=True), max_tokens=3, temperature=0))
    assert [r.token for r in a] == [r.token for r in b]
    assert a[0].prompt_tokens == len(tok.apply_chat_template(msgs, tokenize=True))


def test_seed_reproduces_sampling(demo):
    model, tok = demo
    run = lambda seed: [r.token for r in stream_generate(model, tok, "abc", max_tokens=16, temperature=1.0,
                                                         top_p=0.95, seed=seed)]
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_stop_tokens_and_length(demo):
    model, tok = demo
    rs = list(stream_generate(model, tok, "abc", max_tokens=5, temperature=0, logit_bias={tok.im_end_id: 100.0}))
    assert len(rs) == 1 and rs[0].token == tok.im_end_id and rs[0].finish_reason == "stop" and rs[0].text == ""
    rs = list(stream_generate(model, tok, "abc", max_tokens=5, temperature=0, logit_bias={tok.eos_id: 100.0}))
    assert rs[-1].token == tok.eos_id and rs[-1].finish_reason == "stop"
    bias = {t: -100.0 for t in (tok.im_end_id, tok.eos_id)}
    rs = list(stream_generate(model, tok, "abc", max_tokens=5, temperature=0, logit_bias=bias))
    assert len(rs) == 5 and rs[-1].finish_reason == "length" and rs[-1].generation_tokens == 5


def test_stop_string_split_across_tokens_never_leaks(demo):
    model, tok = demo
    bias = {t: -100.0 for t in (tok.im_end_id, tok.eos_id)}
    kw = dict(max_tokens=40, temperature=0, logit_bias=bias)
    full = generate(model, tok, "Once upon", **kw)
    stop = full[len(full) // 2 : len(full) // 2 + 6]
    assert len(tok.encode(stop)) > 1  # the stop string spans several tokens
    pieces = [r.text for r in stream_generate(model, tok, "Once upon", stop=[stop], **kw)]
    assert "".join(pieces) == full[: full.index(stop)]
    assert "".join(pieces) + stop in full


@pytest.mark.parametrize("stops", [["ab"], ["xyz", "b c"], ["aaa"], ["c", "abc"]])
def test_stop_matcher_equals_find(stops):
    text = "xx abab c aaab abc tail"
    m = StopMatcher(stops)
    out, hit = "", False
    for ch in text:
        piece, hit = m.push(ch)
        out += piece
        if hit:
            break
    if not hit:
        out += m.flush()
    cut = min((text.find(s) for s in stops if s in text), default=len(text))
    assert out == text[:cut]


def test_top_logprobs_are_sorted_and_consistent(demo):
    model, tok = demo
    r = next(iter(stream_generate(model, tok, "abc", max_tokens=1, temperature=0, top_logprobs=4)))
    ids = [i for i, _ in r.top_logprobs]
    vals = [v for _, v in r.top_logprobs]
    assert len(ids) == 4 and vals == sorted(vals, reverse=True) and ids[0] == r.token
    np.testing.assert_allclose(vals, np.sort(np.array(r.logprobs))[::-1][:4], atol=1e-6)
    assert r.prompt_tps > 0 and r.peak_memory > 0


def test_bad_options_are_one_line_errors(demo):
    model, tok = demo
    with pytest.raises(KimiError, match="unknown generation option temp"):
        generate(model, tok, "a", temp=0.5)
    with pytest.raises(KimiError, match="top_p"):
        generate(model, tok, "a", top_p=0)
    with pytest.raises(KimiError, match="prefill_step_size must be >= 0"):
        generate(model, tok, "a", prefill_step_size=-1)
    with pytest.raises(KimiError, match="empty prompt"):
        generate(model, tok, "")


@pytest.mark.parametrize("bad", [-1, "vocab", 10**7])
def test_token_ids_outside_the_vocabulary_are_one_line_errors(demo, bad):
    """An id past the embedding table would be read from outside it (a crash, or garbage): refused up front, for
    one prompt and for a batch, before anything is fed."""
    from kimi_mlx.batch import batch_generate

    model, tok = demo
    bad = model.config.vocab_size if bad == "vocab" else bad
    with pytest.raises(KimiError, match=f"token id {bad} is outside the model's vocabulary"):
        generate(model, tok, [1, 2, bad], max_tokens=2)
    with pytest.raises(KimiError, match=f"token id {bad} is outside"):
        batch_generate(model, tok, [[1, 2], [3, bad]], max_tokens=2)
    assert generate(model, tok, [1, 2, model.config.vocab_size - 1], max_tokens=2, temperature=0) is not None


def test_rewind_to_a_mark_is_exact(demo):
    model, tok = demo
    a, b, c = tok.encode("first part"), tok.encode(" then"), tok.encode(" another ending")
    state = model.new_state(1)
    model(mx.array([a]), state)
    m = mark(state)
    model(mx.array([b]), state)
    rewind(state, m)
    assert state.offset == len(a)
    logits = model(mx.array([c]), state)[0, -1]
    np.testing.assert_allclose(np.array(logits - mx.logsumexp(logits)), fresh_logprobs(model, a + c), atol=ATOL)


def test_context_limit_caps_the_reply(demo, monkeypatch):
    model, tok = demo
    monkeypatch.setattr(model.config, "max_position_embeddings", 10)
    no_stop = {tok.im_end_id: -100.0, tok.eos_id: -100.0}
    rs = list(stream_generate(model, tok, tok.encode("abcdef"), max_tokens=50, temperature=0, logit_bias=no_stop))
    assert len(rs) == 5 and rs[-1].finish_reason == "length"  # 6 + 4 fed = 10; the 5th is not fed
    assert len(generate(model, tok, tok.encode("x" * 10), max_tokens=50, logit_bias=no_stop)) > 0
    with pytest.raises(KimiError, match="context full"):
        generate(model, tok, tok.encode("x" * 11))


def test_model_identity_ignores_decode_matrices_derived_at_load(demo_random):
    """States saved before decode's derived matrices existed still load: the MLA absorb/value matrices and input
    bank and the KDA f_b|g_b bank (made by model/fuse.py from k_up, v_up, q_proj, kv_a_proj_with_mqa, f_b_proj and
    g_b_proj) are not part of a model's identity."""
    from kimi_mlx.state_io import model_identity

    model, _ = demo_random
    derived = ("q_absorb", "v_absorb", "q_kv", "gates_out")
    attns = [l.self_attn for l in model.model.layers]
    assert all(any(n in a for a in attns) for n in derived)
    before = model_identity(model)
    kept = [(a, n, a[n]) for a in attns for n in derived if n in a]
    for a, n, _ in kept:
        del a[n]
    try:
        assert model_identity(model) == before
    finally:
        for a, n, v in kept:
            setattr(a, n, v)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_unquantized_checkpoint_decodes_on_the_cpu(demo, tmp_path, dtype):
    """An unquantized bfloat16 / float16 conversion (MLX's CPU GatherMM takes float32 only) loads and decodes
    through the public API, fused and unfused, close to the float32 model it was converted from."""
    import kimi_mlx
    from kimi_mlx.demo import random_demo_dir
    from kimi_mlx.weights.convert import ConvertOptions, convert

    out = tmp_path / dtype
    convert(str(random_demo_dir()), out, ConvertOptions(dtype=dtype), log=lambda _: None)
    ref_model, tok = demo
    model, _ = kimi_mlx.load(str(out))
    assert model.model.layers[1].mlp.gate_up_proj.weight.dtype == getattr(mx, dtype)
    prompt = tok.encode("The quick brown fox")
    for m in (model, kimi_mlx.load_model(out, fuse=False)):
        rs = list(stream_generate(m, tok, prompt, max_tokens=6, temperature=0.0, logprobs=True))
        assert len(rs) == 6  # decode steps ran (greedy from this prompt meets no stop token)
        tokens = list(prompt)
        for r in rs:
            np.testing.assert_allclose(np.array(r.logprobs), fresh_logprobs(ref_model, tokens), atol=0.05)
            tokens.append(r.token)
