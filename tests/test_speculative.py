"""Speculative decoding against plain decoding: the verification forward bit for bit against decode steps,
greedy tokens with and without drafts, rollback at every position, chats, stop strings, logprobs, and the
acceptance rule's distribution (chi-square over a fixed seed set)."""

import math
import re

import mlx.core as mx
import numpy as np
import pytest

import kimi_mlx
from kimi_mlx import ChatSession
from kimi_mlx.errors import KimiError
from kimi_mlx.generate import Generation, GenerationOptions, generate, stream_generate
from kimi_mlx.model.verify import verify_forward
from kimi_mlx.sample import Sampler, normalize
from kimi_mlx.speculate import ModelDraft, NgramDraft, SpecStats, speculative_steps
from kimi_mlx.state import MLAState

CODE = '''def total_price(items, tax):
    subtotal = 0
    for item in items:
        subtotal += item.price * item.count
    return subtotal * (1 + tax)
'''
COPY = CODE + "\n# the same function, renamed to order_total:\n" + CODE.replace("total_price", "order_total")[:40]
FREE = "Once upon a time"


@pytest.fixture(scope="module", autouse=True)
def on_the_cpu():
    """The contract is bit for bit on the CPU in float32 (a GPU's matmul kernels for a few rows and for one may
    round differently), so these tests run there on any machine."""
    before = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(before)


@pytest.fixture(scope="module")
def demo():
    return kimi_mlx.load("demo")


def states_equal(a, b) -> bool:
    xa, xb = a.arrays(), b.arrays()
    return a.offset == b.offset and xa.keys() == xb.keys() and all(mx.array_equal(xa[k], xb[k]).item() for k in xa)


@pytest.mark.parametrize("T", [2, 5, 16])
def test_verification_rows_equal_decode_steps_bit_for_bit(demo_random, T):
    """Logits of every row and the state after every row equal T one-token decode steps, with small MLA pages so
    the rows cross a page boundary."""
    model, _ = demo_random
    rng = np.random.default_rng(T)
    prompt = rng.integers(0, 256, 21).tolist()
    toks = rng.integers(0, 256, T).tolist()
    plain, spec = model.new_state(1), model.new_state(1)
    for s in (plain, spec):
        for layer in s.layers:
            if isinstance(layer, MLAState):
                layer.page_first, layer.page_grow = 8, 8
        model(mx.array([prompt]), s)
        s.eval()
    logits, marks = verify_forward(model, toks, spec)
    from kimi_mlx.state_io import rewind

    after = []
    for t, tok in enumerate(toks):
        row = model(mx.array([[tok]]), plain)[0, -1]
        assert mx.array_equal(row, logits[t]).item(), t
        after.append(plain.snapshot())
    assert states_equal(plain, spec)
    for t in (0, T // 2, T - 1):  # rewinding to a row's mark is the state decode had there
        rewind(spec, marks[t])
        assert states_equal(spec, after[t])


@pytest.mark.parametrize("prompt", [COPY, FREE, CODE], ids=["copy", "free", "code"])
def test_greedy_text_is_plain_decodings_with_ngram_draft(demo, prompt):
    model, tok = demo
    plain = list(stream_generate(model, tok, prompt, max_tokens=60, temperature=0))
    spec = list(stream_generate(model, tok, prompt, max_tokens=60, temperature=0, draft="ngram"))
    assert [r.token for r in spec] == [r.token for r in plain]
    assert "".join(r.text for r in spec) == "".join(r.text for r in plain)
    assert [r.finish_reason for r in spec] == [r.finish_reason for r in plain]
    s = spec[-1].spec
    assert prompt is not COPY or s.forwards < len(spec)  # copying gains
    assert s.accepted == sum(r.from_draft for r in spec)


def test_greedy_with_draft_model_equal_to_target_accepts_everything(demo):
    model, tok = demo
    plain = generate(model, tok, COPY, max_tokens=30, temperature=0)
    rs = list(stream_generate(model, tok, COPY, max_tokens=30, temperature=0, draft="demo", num_draft=4))
    assert "".join(r.text for r in rs) == plain
    s = rs[-1].spec
    assert s.accepted == s.drafted > 0 and s.tokens_per_forward > 3


class ScriptDraft:
    """Proposes plain decoding's continuation with the token at `wrong` (an index into each round's drafts)
    changed; None: every draft right."""

    def __init__(self, expected, base, wrong, num_draft=5, vocab=512):
        self.expected, self.base, self.wrong, self.num_draft, self.vocab = expected, base, wrong, num_draft, vocab

    def propose(self, committed, y, k, sampler):
        n = len(committed) + 1 - self.base  # y is expected[n - 1]
        drafts = list(self.expected[n : n + k])
        if self.wrong is not None and self.wrong < len(drafts):
            drafts[self.wrong] = (drafts[self.wrong] + 1) % self.vocab
        return drafts, [None] * len(drafts)


@pytest.mark.parametrize("wrong", [0, 1, 2, 3, 4, None])
def test_rollback_at_every_position_of_a_rejected_draft(demo_random, wrong):
    """A draft rejected at each position (and a fully accepted one): same tokens, logprobs and final state."""
    model, tok = demo_random
    prompt = tok.encode("rollback test prompt")
    opts = GenerationOptions(max_tokens=23, temperature=0, logprobs=True)
    plain_state = model.new_state(1)
    plain = list(Generation(model, tok, plain_state, prompt, opts))
    expected = [r.token for r in plain]
    spec_state = model.new_state(1)
    gen = Generation(model, tok, spec_state, prompt, opts)
    gen.draft, gen.spec = ScriptDraft(expected, len(prompt), wrong), SpecStats()
    spec = list(gen)
    assert [r.token for r in spec] == expected
    assert [r.logprob for r in spec] == [r.logprob for r in plain]
    assert states_equal(spec_state, plain_state)
    s = gen.spec
    assert s.drafted > 0 and (s.accepted == s.drafted if wrong is None else s.accepted < s.drafted)
    if wrong == 0:
        assert s.accepted == 0


@pytest.mark.parametrize("stop_at", [3, 8, 14])
def test_consumer_stopping_inside_an_accepted_run_leaves_plain_state(demo_random, stop_at):
    model, tok = demo_random
    prompt = tok.encode("stop early")
    opts = GenerationOptions(max_tokens=30, temperature=0)
    expected = [r.token for r in Generation(model, tok, model.new_state(1), prompt, opts)]
    plain_state, spec_state = model.new_state(1), model.new_state(1)
    for state, draft in ((plain_state, None), (spec_state, ScriptDraft(expected, len(prompt), None, 8))):
        gen = Generation(model, tok, state, prompt, opts)
        if draft:
            gen.draft, gen.spec = draft, SpecStats()
        it = iter(gen)
        for _ in range(stop_at):
            next(it)
        it.close()
    assert states_equal(spec_state, plain_state)


def test_stop_strings_straddling_an_accepted_run(demo):
    model, tok = demo
    spec = list(stream_generate(model, tok, COPY, max_tokens=60, temperature=0, draft="ngram"))
    runs = [i for i in range(1, len(spec) - 1) if spec[i].from_draft and spec[i + 1].from_draft
            and len(spec[i].text) >= 2 and spec[i + 1].text]
    assert runs, "the copy prompt should give accepted runs"
    for i in runs[:3]:
        stop = spec[i].text[-2:] + spec[i + 1].text[:1]
        plain = list(stream_generate(model, tok, COPY, max_tokens=60, temperature=0, stop=[stop]))
        with_draft = list(stream_generate(model, tok, COPY, max_tokens=60, temperature=0, stop=[stop], draft="ngram"))
        assert [(r.token, r.text, r.finish_reason) for r in with_draft] == \
            [(r.token, r.text, r.finish_reason) for r in plain]
        assert with_draft[-1].finish_reason == "stop"


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 7])
def test_max_tokens_and_logprobs_as_plain(demo, max_tokens):
    model, tok = demo
    kw = dict(max_tokens=max_tokens, temperature=0, logprobs=True, top_logprobs=3)
    plain = list(stream_generate(model, tok, COPY, **kw))
    spec = list(stream_generate(model, tok, COPY, draft="ngram", num_draft=4, **kw))
    key = lambda r: (r.token, r.text, r.logprob, r.top_logprobs, r.finish_reason, r.generation_tokens)  # noqa: E731
    assert [key(r) for r in spec] == [key(r) for r in plain]


def test_penalties_see_the_accepted_tokens(demo):
    model, tok = demo
    kw = dict(max_tokens=40, temperature=0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2)
    assert generate(model, tok, COPY, draft="ngram", **kw) == generate(model, tok, COPY, **kw)


def test_chat_with_draft_equals_chat_without(demo):
    model, tok = demo
    texts = ["Write a function that adds two numbers.", "Now repeat it exactly:\n" + CODE, "Thanks."]
    sessions = [ChatSession(model, tok, max_tokens=25, temperature=0, **kw) for kw in ({}, {"draft": "ngram"})]
    for text in texts:
        replies = ["".join(r.text for r in s.send(text)) for s in sessions]
        assert replies[0] == replies[1]
    assert sessions[0].tokens == sessions[1].tokens
    assert states_equal(sessions[0].state, sessions[1].state)


@pytest.mark.parametrize("taken", [5, 9, 14])
def test_chat_reply_stopped_inside_an_accepted_run_leaves_plain_state(demo, taken):
    model, tok = demo
    sessions = [ChatSession(model, tok, max_tokens=40, temperature=0, **kw) for kw in ({}, {"draft": "ngram"})]
    for s in sessions:
        replies = s.send("Repeat this:\n" + CODE)
        for _ in range(taken):
            next(replies)
        replies.close()
        list(s.send("and again"))  # the next turn starts from the kept partial reply
    assert sessions[0].tokens == sessions[1].tokens
    assert states_equal(sessions[0].state, sessions[1].state)


def test_seeded_sampling_with_draft_is_reproducible(demo):
    model, tok = demo
    kw = dict(max_tokens=30, temperature=0.8, seed=7, draft="ngram")
    assert generate(model, tok, COPY, **kw) == generate(model, tok, COPY, **kw)


def chi_square(counts: dict, probs: dict, n: int) -> tuple[float, int]:
    """(statistic, degrees of freedom) of observed counts against expected probabilities, cells of expected
    count under 5 pooled."""
    cells = sorted(probs, key=lambda c: -probs[c])
    stat, pooled_o, pooled_e, df = 0.0, 0, 0.0, -1
    for c in cells:
        e = probs[c] * n
        if e >= 5:
            stat += (counts.get(c, 0) - e) ** 2 / e
            df += 1
        else:
            pooled_o, pooled_e = pooled_o + counts.get(c, 0), pooled_e + e
    if pooled_e > 0:
        stat += (pooled_o - pooled_e) ** 2 / pooled_e
        df += 1
    return stat, df


CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88, 10: 29.59,
            11: 31.26, 12: 32.91, 13: 34.53, 14: 36.12, 15: 37.70}


def exact_pairs(model, prompt, sampler_args):
    """The exact distribution of the first two tokens under plain sampling: {(t1, t2): p}."""
    s = Sampler(**sampler_args)
    first = model(mx.array([prompt]))[0, -1]
    p1 = np.exp(np.array(s.filtered(normalize(first.astype(mx.float32))[None])[0]))
    out = {}
    for t1 in np.nonzero(p1 > 0)[0].tolist():
        second = model(mx.array([prompt + [t1]]))[0, -1]
        p2 = np.exp(np.array(s.filtered(normalize(second.astype(mx.float32))[None])[0]))
        for t2 in np.nonzero(p2 > 0)[0].tolist():
            out[(t1, t2)] = p1[t1] * p2[t2]
    return out


def sample_pairs(model, tok, prompt, sampler_args, make_draft, seeds, drafted=None):
    counts, drafted = {}, drafted if drafted is not None else [0]
    for seed in seeds:
        state = model.new_state(1)
        sampler = Sampler(**sampler_args, seed=seed)
        draft = make_draft()
        stats = SpecStats()
        # 3 tokens: the second is then drafted and verified (a draft is fed, and the last token never is)
        steps = speculative_steps(model, state, prompt, sampler, [], [], [], 3, 0, None, draft, stats)
        pair = tuple(next(steps).token for _ in range(2))
        steps.close()
        drafted[0] += stats.drafted
        counts[pair] = counts.get(pair, 0) + 1
    return counts


class FixedDraft(NgramDraft):
    """A deterministic draft (a point mass q): after token t it proposes choice[t]."""

    def __init__(self, choice: dict):
        super().__init__(num_draft=1)
        self.choice = choice

    def propose(self, k):
        return [self.choice.get(self.tokens[-1], 0)] * k


def test_acceptance_keeps_the_sampling_distribution(demo_random):
    """The first two tokens' empirical distribution over a fixed seed set fits the exact plain-sampling one, for a
    point-mass draft (accept with p(d)) and for a draft model (min(1, p/q), residual max(0, p - q))."""
    model, tok = demo_random
    prompt = tok.encode("chi")
    args = dict(temperature=1.0, top_k=3)
    exact = exact_pairs(model, prompt, args)
    n = 300
    seeds = range(1000, 1000 + n)
    # the point-mass draft after each first token: its second likeliest follower, so it is often accepted and
    # often not (a wrong acceptance probability such as sqrt(p), or a residual keeping d, fails this test)
    choice = {t1: sorted((k for k in exact if k[0] == t1), key=exact.get)[-2][1] for t1, _ in exact}
    draft_model, _ = kimi_mlx.load("demo-random")
    draft_model.lm_head.weight = draft_model.lm_head.weight * 0.5 + 0.05  # another distribution, same vocabulary
    cases = {"point": lambda: FixedDraft(choice), "model": lambda: ModelDraft(draft_model, num_draft=1)}
    for name, make in cases.items():
        drafted = [0]
        counts = sample_pairs(model, tok, prompt, args, make, seeds, drafted)
        assert drafted[0] == n  # every run verified a draft for its second token
        stat, df = chi_square(counts, exact, n)
        assert stat < CHI2_999[df], (name, stat, df, counts)
    plain = sample_pairs(model, tok, prompt, args, lambda: NgramDraft(num_draft=1, ngram=16), seeds)
    stat, df = chi_square(plain, exact, n)
    assert stat < CHI2_999[df], ("plain", stat, df)


def test_draft_with_another_vocabulary_is_one_line(demo):
    model, tok = demo
    with pytest.raises(KimiError, match="vocabulary") as e:
        generate(model, tok, "hi", max_tokens=2, draft="demo-random")
    assert "\n" not in str(e.value)
    with pytest.raises(KimiError, match="num_draft"):
        generate(model, tok, "hi", max_tokens=2, draft="ngram", num_draft=99)
    with pytest.raises(KimiError, match="draft must be"):
        generate(model, tok, "hi", max_tokens=2, draft=True)


def test_ngram_lookup_matches_longest_recent_suffix():
    d = NgramDraft(num_draft=4, ngram=3)
    d.extend([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3])
    assert d.propose(4) == [4, 5, 9, 2]  # the 3-gram "1 2 3" wins over the later 2-gram "2 3"
    d = NgramDraft(num_draft=4, ngram=3)
    d.extend([5, 6, 5, 6])
    assert d.propose(5) == [5, 6, 5, 6, 5]  # a repetition running into the end continues itself
    d = NgramDraft(num_draft=4, ngram=3)
    d.extend([1, 2, 3, 4])
    assert d.propose(4) == []
    assert math.isclose(SpecStats(8, 4, 2, 6).tokens_per_forward, 3.0)


def test_server_speculates_per_request_and_reports_stats():
    from fastapi.testclient import TestClient

    from kimi_mlx.server import ServeOptions, build_app

    body = {"prompt": COPY, "max_tokens": 30, "temperature": 0}
    with TestClient(build_app("demo", ServeOptions(draft="ngram", web=False))) as client:
        spec = client.post("/v1/completions", json=body).json()
        stats = client.get("/stats").json()
        assert stats["draft"] == "ngram" and stats["speculative_replies"] == 1 and stats["accepted"] > 0
        assert stats["tokens_per_forward"] > 1
        plain = client.post("/v1/completions", json={**body, "speculative": False}).json()
        assert client.get("/stats").json()["speculative_replies"] == 1  # that request turned it off
    assert spec["choices"][0]["text"] == plain["choices"][0]["text"]
    with TestClient(build_app("demo", ServeOptions(web=False))) as client:
        assert client.get("/stats").json()["speculative_replies"] == 0
        client.post("/v1/completions", json=body)
        assert client.get("/stats").json()["speculative_replies"] == 0  # off unless --draft or the request asks
        client.post("/v1/completions", json={**body, "speculative": True})
        assert client.get("/stats").json()["speculative_replies"] == 1


@pytest.mark.parametrize("name", ["demo", "demo-random"])
def test_verification_on_the_gpu_kernel_paths_equals_decode_emulated(name, monkeypatch):
    """The KDA decode kernels (the gates variant on the 8-bit demo, the plain one on demo-random) and the MoE
    expert kernels, run by the CPU emulator on their Metal text: a verification's rows equal decode's."""
    import kernel_emulator
    import metal_kernels

    import kimi_mlx.model.kda as kda_layer
    import kimi_mlx.model.verify as verify

    if not kernel_emulator.available():
        pytest.skip("g++ is not installed")
    monkeypatch.setattr(metal_kernels, "kernel", kernel_emulator.kernel_factory("metal"))
    monkeypatch.setattr(kda_layer, "decode_path", lambda *a: "kernel")
    monkeypatch.setattr(verify, "decode_path", lambda *a: "kernel")
    from kimi_mlx.model.fuse import FusedMoE

    monkeypatch.setattr(FusedMoE, "path", lambda self, tokens, decode=False: "kernel" if self.kernel_fits else "gather")
    model, tok = kimi_mlx.load(name)
    model.eager_steps, model._steps = True, None  # the emulated kernels run eagerly
    try:
        prompt = tok.encode("def")
        plain, spec = model.new_state(1), model.new_state(1)
        model(mx.array([prompt]), plain)
        model(mx.array([prompt]), spec)
        toks = [5, 17, 99]
        rows = [model(mx.array([[t]]), plain)[0, -1] for t in toks]
        logits, _ = verify_forward(model, toks, spec)
        assert all(mx.array_equal(logits[i], rows[i]).item() for i in range(len(toks)))
        assert states_equal(plain, spec)
    finally:
        model.eager_steps = False
        model.retrace()


def test_cli_generate_with_draft_prints_plain_text_and_the_draft_stats():
    from typer.testing import CliRunner

    from kimi_mlx.cli import app

    args = ["generate", "--model", "demo", "--raw", "--prompt", COPY, "--temp", "0", "--max-tokens", "30"]
    plain = CliRunner().invoke(app, args)
    spec = CliRunner().invoke(app, [*args, "--draft", "ngram", "--num-draft", "4", "--ngram", "2"])
    assert plain.exit_code == spec.exit_code == 0
    assert spec.stdout == plain.stdout
    assert re.search(r"draft: \d+ drafted, \d+ accepted \(\d+%\), [\d.]+ tokens/forward", spec.stderr)
    import subprocess
    import sys

    bad = subprocess.run([sys.executable, "-m", "kimi_mlx", *args, "--draft", "demo-random"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "vocabulary" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not bad.stdout.strip()


@pytest.mark.parametrize("T,extreme", [(2, False), (7, True), (16, False)])
def test_kda_rows_op_equals_decode_steps_on_random_inputs(T, extreme):
    """decode_rows_ops (the conv, norms and gates of T tokens at once) against decode_step_ops token by token
    (bit for bit) and the reference decode_step_ref (to rounding), on fresh random inputs; extreme: gates that
    decay to ~0 or not at all, and saturated betas."""
    from kimi_mlx.ops.kda_decode import decode_rows_ops, decode_step_ops, decode_step_ref

    B, H, Dk, Dv, K = 2, 3, 32, 16, 4
    C3 = 2 * H * Dk + H * Dv
    rng = np.random.default_rng(T)
    r = lambda *shape, scale=1.0: mx.array(rng.standard_normal(shape).astype(np.float32) * scale)  # noqa: E731
    qkv, gate_a, beta_logit, gate_b = r(B, T, C3), r(B, T, H * Dk), r(B, T, H), r(B, T, H * Dv)
    if extreme:
        gate_a = mx.where(r(B, T, H * Dk) > 0, 30.0, -30.0)
        beta_logit = mx.where(r(B, T, H) > 0, 20.0, -20.0)
    tail, conv_w, a_log, dt_bias = r(B, K - 1, C3), r(K, C3), r(H, scale=0.5), r(H * Dk)
    state, norm_w = r(B, H, Dv, Dk), r(Dv)
    y, after = decode_rows_ops(qkv, gate_a, beta_logit, tail, conv_w, a_log, dt_bias, state, gate_b, norm_w, 1e-5)
    s_ops = s_ref = state
    t_ops = t_ref = tail
    for t in range(T):
        args = (qkv[:, t], gate_a[:, t], beta_logit[:, t])
        y_ops, s_ops, t_ops = decode_step_ops(*args, t_ops, conv_w, a_log, dt_bias, s_ops, gate_b[:, t], norm_w, 1e-5)
        y_ref, s_ref, t_ref = decode_step_ref(*args, t_ref, conv_w, a_log, dt_bias, s_ref, gate_b[:, t], norm_w, 1e-5)
        assert mx.array_equal(y[:, t], y_ops).item()
        assert mx.array_equal(after[t][0], t_ops).item() and mx.array_equal(after[t][1], s_ops).item()
        np.testing.assert_allclose(np.array(y[:, t]), np.array(y_ref), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.array(after[t][1]), np.array(s_ref), rtol=1e-4, atol=1e-4)


def test_greedy_with_a_disagreeing_draft_model_is_plain_decoding(demo_random):
    """A draft model that is often wrong: rejections at varied positions, the draft's own state rewound each
    round; the tokens and final state are plain decoding's."""
    model, tok = demo_random
    draft_model, _ = kimi_mlx.load("demo-random")
    draft_model.lm_head.weight = draft_model.lm_head.weight + 0.02 * mx.random.normal(
        draft_model.lm_head.weight.shape, key=mx.random.key(3))
    prompt = tok.encode("a draft model that disagrees")
    opts = GenerationOptions(max_tokens=40, temperature=0)
    plain_state, spec_state = model.new_state(1), model.new_state(1)
    expected = [r.token for r in Generation(model, tok, plain_state, prompt, opts)]
    gen = Generation(model, tok, spec_state, prompt, opts)
    gen.draft, gen.spec = ModelDraft(draft_model, num_draft=4), SpecStats()
    assert [r.token for r in gen] == expected
    assert states_equal(spec_state, plain_state)
    assert 0 < gen.spec.accepted < gen.spec.drafted


@pytest.mark.parametrize("kind", ["metal", "cuda"])
@pytest.mark.parametrize("T,extreme", [(3, False), (6, True)])
def test_rows_kernel_equals_the_decode_kernel_token_by_token_emulated(kind, T, extreme, monkeypatch):
    """kda_decode_rows (all T tokens in one launch) against kda_decode launched once a token, both texts run by
    the emulator: bit for bit (the same arithmetic in the same order), and the reference to rounding; bf16 inputs,
    several 32-lane groups a head; extreme: gates that decay to ~0 or not at all, saturated betas."""
    import kernel_emulator
    import metal_kernels

    from kimi_mlx.ops.kda_decode import decode_rows_kernel, decode_step_kernel, decode_step_ref

    if not kernel_emulator.available():
        pytest.skip("g++ is not installed")
    monkeypatch.setattr(metal_kernels, "kernel", kernel_emulator.kernel_factory(kind))
    B, H, Dk, Dv, K = 2, 2, 64, 64, 4
    C3 = 2 * H * Dk + H * Dv
    rng = np.random.default_rng(T)
    r = lambda *shape: mx.array(rng.standard_normal(shape).astype(np.float32))  # noqa: E731
    bf = mx.bfloat16
    qkv, gate_a, beta_logit, gate_b = (a.astype(bf) for a in (r(B, T, C3), r(B, T, H * Dk), r(B, T, H), r(B, T, H * Dv)))
    if extreme:
        gate_a = mx.where(r(B, T, H * Dk) > 0, 30.0, -30.0).astype(bf)
        beta_logit = mx.where(r(B, T, H) > 0, 20.0, -20.0).astype(bf)
    tail, conv_w, a_log, dt_bias = r(B, K - 1, C3).astype(bf), r(K, C3).astype(bf), r(H), r(H * Dk)
    state, norm_w = r(B, H, Dv, Dk), r(Dv)
    y, after = decode_rows_kernel(qkv, gate_a, beta_logit, tail, conv_w, a_log, dt_bias, state, gate_b, norm_w, 1e-5)
    s_k = s_ref = state
    t_k = t_ref = tail
    for t in range(T):
        args = (qkv[:, t], gate_a[:, t], beta_logit[:, t])
        y_k, s_k, t_k = decode_step_kernel(*args, t_k, conv_w, a_log, dt_bias, s_k, gate_b[:, t], norm_w, 1e-5)
        y_ref, s_ref, t_ref = decode_step_ref(*args, t_ref, conv_w, a_log, dt_bias, s_ref, gate_b[:, t], norm_w, 1e-5)
        assert mx.array_equal(y[:, t], y_k).item(), t
        assert mx.array_equal(after[t][1], s_k).item() and mx.array_equal(after[t][0], t_k).item(), t
        np.testing.assert_allclose(np.array(after[t][1]), np.array(s_ref), rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(np.array(y[:, t].astype(mx.float32)), np.array(y_ref.astype(mx.float32)),
                                   rtol=2e-2, atol=2e-2)


def test_verification_with_the_rows_kernel_equals_decode_emulated(demo_random, monkeypatch):
    """KIMI_MLX_KDA_ROWS=on: the verification's KDA steps as one kda_decode_rows launch a layer (emulated), against
    decode on the kda_decode kernel (demo-random's f_b and g_b are matmuls on both paths): bit for bit."""
    import kernel_emulator
    import metal_kernels

    import kimi_mlx.model.kda as kda_layer
    import kimi_mlx.model.verify as verify

    if not kernel_emulator.available():
        pytest.skip("g++ is not installed")
    launched = []
    emulated = kernel_emulator.kernel_factory("metal")
    monkeypatch.setattr(metal_kernels, "kernel", lambda name: launched.append(name) or emulated(name))
    monkeypatch.setattr(kda_layer, "decode_path", lambda *a: "kernel")
    monkeypatch.setattr(verify, "decode_path", lambda *a: "kernel")
    monkeypatch.setattr(verify, "rows_path", lambda *a: "rows")
    model, tok = demo_random
    model.eager_steps, model._steps = True, None
    try:
        prompt = tok.encode("rows")
        plain, spec = model.new_state(1), model.new_state(1)
        model(mx.array([prompt]), plain)
        model(mx.array([prompt]), spec)
        toks = [5, 17, 99, 3]
        rows = [model(mx.array([[t]]), plain)[0, -1] for t in toks]
        launched.clear()
        logits, marks = verify_forward(model, toks, spec)
        assert "kda_decode_rows" in launched and "kda_decode" not in launched
        assert all(mx.array_equal(logits[i], rows[i]).item() for i in range(len(toks)))
        assert states_equal(plain, spec)
    finally:
        model.eager_steps = False
        model.retrace()


def test_server_engine_runs_a_speculative_turn_among_batched_turns(demo):
    """A speculative turn decodes beside the batch, a round an engine iteration: the batched turns' rows go on
    while it runs (pieces of both come between its first and its last), and every turn's reply equals the turn
    alone, plain."""
    from kimi_mlx.server.worker import Engine, EngineSettings, Piece

    from test_server_batch import alone, run_together, turn

    model, tok = demo
    ban = {tok.im_end_id: -100.0, tok.eos_id: -100.0}
    plain_specs = [turn(tok, "tell me a long story about a fox " * 3, max_tokens=16, logit_bias=ban),
                   turn(tok, "Repeat this:\n" + CODE, max_tokens=24, logit_bias=ban),
                   turn(tok, "one more", max_tokens=12, logit_bias=ban)]
    specs = [turn(tok, "tell me a long story about a fox " * 3, max_tokens=16, logit_bias=ban),
             turn(tok, "Repeat this:\n" + CODE, max_tokens=24, logit_bias=ban, draft="ngram"),
             turn(tok, "one more", max_tokens=12, logit_bias=ban)]
    engine = Engine(model, tok, EngineSettings(prefix_cache_bytes=0, prefill_step_size=16))
    order = []  # (turn, event kind) in the order the engine sent them
    together = run_together(engine, specs, each=lambda i, ev: order.append((i, type(ev).__name__)))
    assert engine.spec_replies == 1 and engine.spec.forwards > 0
    ours = [k for k, (i, kind) in enumerate(order) if i == 1 and kind == "Piece"]
    between = [i for i, kind in order[ours[0]: ours[-1]] if kind == "Piece" and i != 1]
    assert between, order  # the batched rows decoded while the speculative turn ran
    for spec, got in zip(plain_specs, together):
        want = alone(demo, spec)
        assert got.tokens() == want.tokens()
        assert "".join(e.text for e in got.events if isinstance(e, Piece)) == \
            "".join(e.text for e in want.events if isinstance(e, Piece))
        g, w = got.finished(), want.finished()
        assert (g.finish_reason, g.completion_tokens, g.generated) == (w.finish_reason, w.completion_tokens,
                                                                       w.generated)


def test_server_engine_counts_speculative_turns_in_max_batch_and_cancels_one_mid_reply(demo):
    """--max-batch bounds the batch's rows and the speculative turns together; a speculative turn cancelled mid-reply
    ends with 'cancelled' while the batched turn goes on and replies as alone."""
    from kimi_mlx.server.worker import Engine, EngineSettings, Failed

    from test_server_batch import alone, run_together, turn

    model, tok = demo
    ban = {tok.im_end_id: -100.0, tok.eos_id: -100.0}
    specs = [turn(tok, "Repeat this:\n" + CODE, max_tokens=400, logit_bias=ban, draft="ngram"),
             turn(tok, "tell me a long story about a fox " * 3, max_tokens=16, logit_bias=ban),
             turn(tok, "one more", max_tokens=12, logit_bias=ban)]
    engine = Engine(model, tok, EngineSettings(prefix_cache_bytes=0, prefill_step_size=16, max_batch=2))
    running, cancelled = [], []

    def each(i, ev):
        running.append(engine.batch.running + len(engine._speculating))
        if i == 2 and type(ev).__name__ == "Piece" and not cancelled:
            cancelled.append(engine._speculating[0])  # the speculative turn, still running
            engine.cancel(cancelled[0])  # as a client's disconnect does; the turn leaves at the next iteration

    got = run_together(engine, specs, each=each)
    assert max(running) == 2  # never three sequences at once
    assert isinstance(got[0].events[-1], Failed) and "cancelled" in got[0].events[-1].message
    assert 16 < len(got[0].tokens()) < 400  # cancelled mid-reply, after the first batched turn's 16 tokens
    assert engine.spec_replies == 0 and not engine._speculating
    for spec, sink in zip(specs[1:], got[1:]):
        assert sink.tokens() == alone(demo, spec).tokens()


@pytest.mark.parametrize("fixed, row_cost, hits, most, want", [
    (0.0, 0.85, 0, 8, 0),  # a CPU at the prior 0.5: plain decoding is better
    (0.0, 0.85, 60, 8, 8),  # ... after 60 checked guesses all right: a wide draft pays even there
    (0.0, 0.3, 0, 8, 1),  # cheap rows and no fixed cost, at the prior: one token
    (0.0, 0.3, 30, 15, 13),  # ... at ~0.98 acceptance: wide, short of the most
    (0.55, 0.19, 0, 8, 0),  # a GPU's fixed cost at the prior: plain decoding is better
    (0.55, 0.19, 8, 8, 5),  # ... at ~0.78 acceptance: five drafts
    (0.55, 0.19, 30, 15, 15),  # ... at ~0.98: the most
    (0.55, 0.19, 30, 2, 2),  # never past num_draft
    (0.0, 0.0, 0, 4, 4),  # rows free: always the most
])
def test_draft_width_is_the_best_expected_tokens_per_cost(fixed, row_cost, hits, most, want):
    from kimi_mlx.speculate import DraftWidth

    w = DraftWidth(row_cost, fixed)
    for _ in range(hits):
        w.observe(True)
    with kimi_mlx.settings.override(KIMI_MLX_DRAFT_WIDTH="auto"):
        assert w.width(most) == want
    with kimi_mlx.settings.override(KIMI_MLX_DRAFT_WIDTH="max"):
        assert w.width(most) == most
    for _ in range(40):
        w.observe(False)
    with kimi_mlx.settings.override(KIMI_MLX_DRAFT_WIDTH="auto"):
        assert w.width(most) == 0  # guesses gone wrong: plain steps, even where rows cost nothing


@pytest.mark.parametrize("prompt", [COPY, FREE], ids=["copy", "free"])
def test_auto_width_checks_prompt_lookup_during_plain_steps_and_keeps_the_text(demo, monkeypatch, prompt):
    """KIMI_MLX_DRAFT_WIDTH=auto on the CPU: plain decoding's text; while it decodes plainly prompt lookup's guesses
    are still checked (against the tokens decoded, no forward), so the width can open when they turn right."""
    import kimi_mlx.speculate as speculate

    seen = []

    class Recording(speculate.DraftWidth):
        def observe(self, hit):
            seen.append(hit)
            super().observe(hit)

    monkeypatch.setattr(speculate, "DraftWidth", Recording)
    model, tok = demo
    kw = dict(max_tokens=40, temperature=0)
    with kimi_mlx.settings.override(KIMI_MLX_DRAFT_WIDTH="auto"):
        spec = list(stream_generate(model, tok, prompt, draft="ngram", **kw))
    assert [r.token for r in spec] == [r.token for r in stream_generate(model, tok, prompt, **kw)]
    assert seen, "prompt lookup's guesses should be checked"
    if prompt == COPY:
        assert sum(seen) > len(seen) / 2  # the copy is guessed right mostly


def test_auto_width_keeps_a_seeded_sampled_run_repeatable(demo):
    model, tok = demo
    kw = dict(max_tokens=30, temperature=0.8, seed=7, draft="ngram")
    with kimi_mlx.settings.override(KIMI_MLX_DRAFT_WIDTH="auto"):
        assert generate(model, tok, COPY, **kw) == generate(model, tok, COPY, **kw)
