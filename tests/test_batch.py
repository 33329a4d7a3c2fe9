"""The batched engine (kimi_mlx/batch.py) against one-by-one generation: ragged prompts, greedy and seeded
sampling, n > 1, rows leaving and joining mid-decode, a row's state read back. Every test runs the batched
engine and its sequential twin (reference=True)."""

import mlx.core as mx
import numpy as np
import pytest

import kimi_mlx
from kimi_mlx.batch import BatchGenerator, batch_generate, stream_batch
from kimi_mlx.errors import KimiError
from kimi_mlx.feed import prefill
from kimi_mlx.generate import GenerationOptions, generate, stream_generate

PROMPTS = ["The quick brown fox", "a", "Once upon a time, in a land far away, there lived", "12345 67"]
# logprobs of a row batched vs alone: CPU float32 rounds rows alike (1e-5); a GPU's matmul kernels for one row and
# for several may round differently (the bound there: 1e-3), the tokens stay the same
ATOL = 1e-5 if mx.default_device() == mx.cpu else 1e-3


@pytest.fixture(scope="module")
def demo(demo_random):
    return demo_random


@pytest.fixture(params=[False, True], ids=["batched", "reference"])
def reference(request):
    return request.param


def alone(model, tok, prompt, **opts):
    return list(stream_generate(model, tok, prompt, **opts))


def by_row(pairs):
    rows = {}
    for i, r in pairs:
        rows.setdefault(i, []).append(r)
    return rows


def assert_same(rows, ref):
    assert [r.token for r in rows] == [r.token for r in ref]
    assert "".join(r.text for r in rows) == "".join(r.text for r in ref)
    assert [r.finish_reason for r in rows] == [r.finish_reason for r in ref]
    for a, b in zip(rows, ref):
        if b.logprob is not None:
            assert a.logprob == pytest.approx(b.logprob, abs=ATOL)
            np.testing.assert_allclose(np.array(a.logprobs), np.array(b.logprobs), atol=ATOL)


def test_batch_generate_equals_one_by_one_greedy(demo, reference):
    model, tok = demo
    texts = batch_generate(model, tok, PROMPTS, max_tokens=10, temperature=0.0, reference=reference)
    assert texts == [generate(model, tok, p, max_tokens=10, temperature=0.0) for p in PROMPTS]


def test_ragged_rows_equal_one_by_one_with_logprobs(demo, reference):
    model, tok = demo
    opts = dict(max_tokens=9, temperature=0.0, logprobs=True, top_logprobs=3, stop=["e"])
    rows = by_row(stream_batch(model, tok, PROMPTS, reference=reference, max_batch=3, **opts))
    assert sorted(rows) == list(range(len(PROMPTS)))
    for i, p in enumerate(PROMPTS):
        ref = alone(model, tok, p, **opts)
        assert_same(rows[i], ref)
        assert rows[i][0].prompt_tokens == len(tok.encode(p))


def test_seeded_rows_reproduce_their_own_streams(demo, reference):
    model, tok = demo
    opts = dict(max_tokens=8, temperature=1.0, top_p=0.9, seed=11, repetition_penalty=1.3, presence_penalty=0.5)
    rows = by_row(stream_batch(model, tok, PROMPTS[:3], reference=reference, **opts))
    for i, p in enumerate(PROMPTS[:3]):
        assert_same(rows[i], alone(model, tok, p, **opts))


def test_n_rows_share_a_prompt_with_seeds_seed_plus_j(demo, reference):
    model, tok = demo
    opts = dict(max_tokens=8, temperature=1.0, seed=3)
    rows = by_row(stream_batch(model, tok, ["Hello there", "xyz"], n=3, reference=reference, **opts))
    assert sorted(rows) == list(range(6))
    for i, p in enumerate(["Hello there", "xyz"]):
        for j in range(3):
            assert_same(rows[i * 3 + j], alone(model, tok, p, **{**opts, "seed": 3 + j}))
    assert len({tuple(r.token for r in rows[j]) for j in range(3)}) > 1  # the samples differ


def prefilled(model, tok, prompt):
    ids = tok.encode(prompt)
    state = model.new_state(1)
    prefill(model, state, ids[:-1])
    return state, ids


def test_a_row_removed_mid_way_leaves_the_others_unchanged(demo, reference):
    model, tok = demo
    opts = GenerationOptions(max_tokens=10, temperature=0.0)
    gen = BatchGenerator(model, tok, max_batch=4, reference=reference)
    seqs = {}
    for p in PROMPTS[:3]:
        state, ids = prefilled(model, tok, p)
        seqs[gen.insert(state, ids[-1], opts, context_tail=ids[:-1])[0]] = p
        assert state.offset == len(ids) - 1  # not mutated
    got = {s: [] for s in seqs}
    for k in range(10):
        if k == 3:
            gone = list(seqs)[1]
            gen.remove(gone)
            assert gen.running == 2 and gen.free == 2
        for s, r in gen.step():
            got[s].append(r)
    assert gen.running == 0 and len(got[gone]) == 3
    for s, p in seqs.items():
        ref = alone(model, tok, p, max_tokens=10, temperature=0.0)
        assert_same(got[s], ref[: len(got[s])])
        if s != gone:
            assert len(got[s]) == len(ref)


def test_rows_joining_mid_way_and_a_row_restored_from_its_state(demo, reference):
    """Rows join at different steps; a row's state(seq) read mid-way and inserted again with its last token
    continues exactly as the row itself does."""
    model, tok = demo
    opts = GenerationOptions(max_tokens=12, temperature=0.0, logprobs=True)
    gen = BatchGenerator(model, tok, max_batch=3, reference=reference)
    got, prompts = {}, {}
    state, ids = prefilled(model, tok, PROMPTS[0])
    first = gen.insert(state, ids[-1], opts, context_tail=ids[:-1])[0]
    prompts[first], got[first] = PROMPTS[0], []
    restored = None
    for k in range(14):
        if k == 2:
            state, ids = prefilled(model, tok, PROMPTS[2])
            s = gen.insert(state, ids[-1], opts, context_tail=ids[:-1])[0]
            prompts[s], got[s] = PROMPTS[2], []
        if k == 5:
            snap, toks = gen.state(first), gen.tokens(first)
            assert snap.offset == len(tok.encode(PROMPTS[0])) + len(toks) - 1
            ctx = tok.encode(PROMPTS[0]) + toks[:-1]
            restored = gen.insert(snap, toks[-1], opts.updated(max_tokens=12 - len(toks)), context_tail=ctx)[0]
            got[restored] = []
        for s, r in gen.step():
            got[s].append(r)
    for s in (first, prompts and list(prompts)[1]):
        assert_same(got[s], alone(model, tok, prompts[s], max_tokens=12, temperature=0.0, logprobs=True))
    assert [r.token for r in got[restored]] == [r.token for r in got[first]][5:]


def test_errors_are_one_line(demo, reference):
    model, tok = demo
    gen = BatchGenerator(model, tok, max_batch=2, reference=reference)
    state, ids = prefilled(model, tok, "abc")
    with pytest.raises(KimiError, match="do not fit"):
        gen.insert(state, ids[-1], GenerationOptions(), n=3)
    with pytest.raises(KimiError, match="n must be"):
        gen.insert(state, ids[-1], GenerationOptions(), n=0)
    with pytest.raises(KimiError, match="no sequence 7"):
        gen.remove(7)
    with pytest.raises(KimiError, match="n must be between"):
        batch_generate(model, tok, ["a"], n=3, max_batch=2)
    with pytest.raises(KimiError, match="unknown generation option"):
        batch_generate(model, tok, ["a"], colour=3)


def test_package_exports():
    assert kimi_mlx.batch_generate is batch_generate and kimi_mlx.stream_batch is stream_batch


def test_penalties_see_context_and_prompt_as_context():
    """sampling_context wires the processors as sample.py documents them: presence and frequency penalties
    count only generated tokens (never the prompt), the repetition window runs over context + prompt + output."""
    from test_sample import V, ref_processors

    from kimi_mlx.generate import sampling_context

    opts = GenerationOptions(repetition_penalty=1.5, repetition_context_size=6, presence_penalty=0.7,
                             frequency_penalty=0.3)
    context, prompt, generated = [1, 2, 3, 3, 4, 7, 7, 8], [4, 6], [4, 5, 5, 9]
    procs, tail = sampling_context(opts, context, prompt)
    logits = np.linspace(-3, 3, V, dtype=np.float32)
    out = mx.array(logits[None])
    for p in procs:
        out = p(mx.array(tail + prompt + generated), out)
    np.testing.assert_allclose(np.array(out)[0], ref_processors(opts, context + prompt, generated, logits),
                               rtol=1e-6, atol=1e-6)


def run_schedule(model, tok, reference, bits=0):
    """A ragged schedule on a BatchGenerator of max_batch 4: prompts of 1 to 260 tokens (rows crossing a page
    boundary), greedy, seeded and penalised rows, n = 2, a row removed, rows joining as others finish, a row
    restored from another's mid-decode state. Returns each sequence's (token, logprob, finish) list."""
    rng = np.random.default_rng(5)
    prompts = [[int(t) for t in rng.integers(3, 200, size=n)] for n in (1, 260, 12, 40, 7, 250)]
    opts = [GenerationOptions(max_tokens=14, temperature=0.0, logprobs=True),
            GenerationOptions(max_tokens=12, temperature=0.0, logprobs=True),
            GenerationOptions(max_tokens=16, temperature=0.9, top_k=20, seed=4, logprobs=True),
            GenerationOptions(max_tokens=9, temperature=0.0, repetition_penalty=1.4, frequency_penalty=0.4,
                              logprobs=True),
            GenerationOptions(max_tokens=10, temperature=1.0, min_p=0.05, seed=9, logprobs=True),
            GenerationOptions(max_tokens=20, temperature=0.0, logprobs=True)]
    gen = BatchGenerator(model, tok, max_batch=4, reference=reference)
    got, queue = {}, list(range(len(prompts)))

    def join(i, n=1):
        state = model.new_state(1, cache_bits=bits)
        prefill(model, state, prompts[i][:-1])
        for s in gen.insert(state, int(prompts[i][-1]), opts[i], context_tail=prompts[i][:-1], n=n):
            got[s] = []

    join(queue.pop(0))
    join(queue.pop(0), n=2)
    restore = None
    for k in range(60):
        if k == 3:
            gen.remove(1)
        if k == 6:
            restore = gen.state(0), gen.tokens(0)
        if restore and gen.free:  # joins as soon as a row is free (before the queue)
            snap, toks = restore
            restore = None
            for s in gen.insert(snap, toks[-1], opts[0].updated(max_tokens=14 - len(toks)),
                                context_tail=prompts[0] + toks[:-1]):
                got[s], got["restored"] = [], s
        while queue and gen.free:
            join(queue.pop(0))
        for s, r in gen.step():
            got[s].append((r.token, r.logprob, r.finish_reason))
        if not gen.running and not queue:
            break
    assert not gen.running
    return got


def test_batched_engine_equals_its_sequential_twin_on_a_ragged_schedule(demo):
    model, tok = demo
    got, ref = run_schedule(model, tok, False), run_schedule(model, tok, True)
    restored = got.pop("restored")
    assert restored == ref.pop("restored") and sorted(got) == sorted(ref) and len(got) == 8
    for s in ref:
        assert [t for t, _, _ in got[s]] == [t for t, _, _ in ref[s]], s
        assert [f for _, _, f in got[s]] == [f for _, _, f in ref[s]], s
        np.testing.assert_allclose([p for _, p, _ in got[s]], [p for _, p, _ in ref[s]], atol=ATOL)
    assert len(got[1]) == 3 and got[restored] == got[0][6:]  # removed; restored from row 0's state


def test_batched_engine_with_a_quantized_cache(hf_checkpoint):
    from kimi_mlx.tokenizer import Tokenizer
    from kimi_mlx.weights.load import load_model

    path = hf_checkpoint("kkkmkm", kv_lora_rank=122, first_k_dense_replace=6)[1]
    model, tok = load_model(path), kimi_mlx.load("demo-random")[1]
    got, ref = run_schedule(model, tok, False, bits=8), run_schedule(model, tok, True, bits=8)
    assert got.pop("restored") == ref.pop("restored")
    for s in ref:
        assert [t for t, _, _ in got[s]] == [t for t, _, _ in ref[s]], s


def test_a_finished_rows_state_stays_readable_until_the_next_step(demo, reference):
    model, tok = demo
    gen = BatchGenerator(model, tok, max_batch=2, reference=reference)
    state, ids = prefilled(model, tok, "Hello")
    seq = gen.insert(state, ids[-1], GenerationOptions(max_tokens=5, temperature=0.0))[0]
    rs = [r for _ in range(5) for _, r in gen.step()]
    assert rs[-1].finish_reason and gen.running == 0
    final, toks = gen.state(seq), gen.tokens(seq)
    assert final.offset == len(ids) + len(toks) - 1
    more = alone(model, tok, ids, max_tokens=8, temperature=0.0)
    assert toks == [r.token for r in more[:5]]
    gen2 = BatchGenerator(model, tok, max_batch=1, reference=reference)
    gen2.insert(final, toks[-1], GenerationOptions(max_tokens=3, temperature=0.0))
    assert [r.token for _ in range(3) for _, r in gen2.step()] == [r.token for r in more[5:]]
    gen.step()
    with pytest.raises(KimiError, match="no sequence"):
        gen.state(seq)


def test_cli_generate_n_prints_each_sample(demo):
    """`kimi-mlx generate --n 3`: three samples of one prompt, sample j drawn with seed + j, each equal to that
    seed's single generation."""
    from typer.testing import CliRunner

    from kimi_mlx.cli import app

    model, tok = demo
    r = CliRunner().invoke(app, ["generate", "--model", "demo-random", "--prompt", "hi", "--n", "3", "--max-tokens",
                                 "6", "--seed", "5", "--temperature", "1.0"])
    assert r.exit_code == 0, r.output
    messages = [{"role": "user", "content": "hi"}]
    for j in range(3):
        text = generate(model, tok, messages, max_tokens=6, temperature=1.0, seed=5 + j)
        assert f"[sample {j + 1}]\n{text}\n" in r.stdout
    assert "3 samples" in r.output


def test_bytes_with_is_what_the_batch_holds_after_the_join(demo):
    model, tok = demo
    gen = BatchGenerator(model, tok, max_batch=4)
    for prompt, n in (("abc", 1), ("x" * 300, 2)):
        state, ids = prefilled(model, tok, prompt)
        want = gen.bytes_with(state, n)
        gen.insert(state, ids[-1], GenerationOptions(max_tokens=4, temperature=0.0), n=n)
        gen.step()
        assert gen.nbytes == want


PAUSE_OPTIONS = {"greedy": dict(max_tokens=8, temperature=0.0, logprobs=True),
                 "seeded": dict(max_tokens=8, temperature=1.0, top_p=0.9, seed=7, logprobs=True),
                 "penalised": dict(max_tokens=8, temperature=0.8, seed=5, repetition_penalty=1.5,
                                   presence_penalty=0.5, logprobs=True, top_logprobs=2)}


@pytest.mark.parametrize("kind", list(PAUSE_OPTIONS))
def test_a_paused_row_resumes_exactly(demo, reference, kind):
    """A row paused at any point (right after insert; mid-way; when its next token is its last allowed) and resumed
    later, into another slot (the batch was cut to the rows left, and a row joined meanwhile), yields the
    same tokens, text, finish and logprobs as never paused; so do the rows around it."""
    model, tok = demo
    opts = PAUSE_OPTIONS[kind]
    M = opts["max_tokens"]
    want = {p: alone(model, tok, p, **opts) for p in PROMPTS}
    for k in (0, 3, M - 1):
        gen = BatchGenerator(model, tok, max_batch=4, reference=reference)
        prompts = {}
        for p in PROMPTS[:3]:
            state, ids = prefilled(model, tok, p)
            prompts[gen.insert(state, ids[-1], GenerationOptions(**opts), context_tail=ids[:-1])[0]] = p
        target = list(prompts)[1]
        got = {s: [] for s in prompts}
        paused, step = None, -1
        while step < k + 2 or gen.running:
            step += 1
            if step == k:
                paused = gen.pause(target)
                assert gen.running == 2
                assert paused.nbytes > 0
                if not reference:
                    assert paused.tokens == len(tok.encode(prompts[target])) + k
                    assert paused.nbytes == paused.state.nbytes + paused.pending[1].nbytes + paused.pending[0].nbytes
                with pytest.raises(KimiError, match="no running sequence"):
                    gen.pause(target)
            if step == k + 1:  # a new row joins
                state, ids = prefilled(model, tok, PROMPTS[3])
                s = gen.insert(state, ids[-1], GenerationOptions(**opts), context_tail=ids[:-1])[0]
                prompts[s], got[s] = PROMPTS[3], []
            if step == k + 2:
                gen.compact()
                assert gen.resume(paused) == target and gen.running == len([s for s in got if not got[s] or
                                                                              not got[s][-1].finish_reason])
                paused = None
            for s, r in gen.step():
                got[s].append(r)
                if s == target and r.finish_reason:  # its final state, readable until the next step
                    assert gen.state(target).offset == len(tok.encode(prompts[target])) + M - 1
        assert not gen.running and paused is None
        for s, p in prompts.items():
            assert_same(got[s], want[p])
            assert len(got[s]) == M


def test_compact_gives_the_memory_back_and_rows_go_on(demo, reference):
    """Pausing rows then compact(): the batched state shrinks to the rows left (capacity and page); every row's
    Responses, the paused one's after resume too, stay those of the row alone; a resumed row's state() is
    readable after its next step."""
    model, tok = demo
    opts = dict(max_tokens=6, temperature=0.0, logprobs=True)
    gen = BatchGenerator(model, tok, max_batch=4, reference=reference)
    long = "a b c d e f " * 60  # past the first page: the page shrinks when it leaves
    prompts = {}
    for p in (PROMPTS[0], long, PROMPTS[2], PROMPTS[3]):
        state, ids = prefilled(model, tok, p)
        prompts[gen.insert(state, ids[-1], GenerationOptions(**opts), context_tail=ids[:-1])[0]] = p
    got = {s: [r] for s, r in gen.step()}
    seqs = list(prompts)
    before = gen.nbytes
    paused = [gen.pause(seqs[1]), gen.pause(seqs[3])]
    gen.compact()
    if not reference:
        assert gen.layout == (2, 256) and gen.nbytes < before / 2
    with pytest.raises(KimiError, match="no sequence"):
        gen.state(seqs[1])
    for s, r in gen.step():
        got[s].append(r)
    for p in paused:
        gen.resume(p)
    if not reference:
        with pytest.raises(KimiError, match="after the next step"):
            gen.state(seqs[1])
    while gen.running:
        for s, r in gen.step():
            got[s].append(r)
    for s, p in prompts.items():
        assert_same(got[s], alone(model, tok, p, **opts))


def test_the_batch_shrinks_to_the_rows_left_and_they_go_on(demo):
    """Rows that finish at different steps: before each step the batched state is cut to the slots the running
    rows need (a lone row left in a batch of 4 decodes as one row, not four), and every row's Responses stay those
    of the row alone, whichever slot it held."""
    model, tok = demo
    gen = BatchGenerator(model, tok, max_batch=4)
    prompts, lengths = {}, (3, 9, 5, 12)
    for p, n in zip(PROMPTS[:4], lengths):
        state, ids = prefilled(model, tok, p)
        seq = gen.insert(state, ids[-1], GenerationOptions(max_tokens=n, temperature=0.0, logprobs=True),
                         context_tail=ids[:-1])[0]
        prompts[seq] = (p, n)
    got = {s: [] for s in prompts}
    seen = []
    while gen.running:
        for s, r in gen.step():
            got[s].append(r)
        seen.append((gen.running, gen.layout[0]))
    # after each step: (rows still running, slots the step computed); each step computes only the slots that the
    # rows running when it began need, so the longest row ends alone in one slot
    assert (1, 1) in seen and (2, 2) in seen, seen
    for (running, _), (_, slots) in zip(seen, seen[1:]):
        assert slots == 1 << (running - 1).bit_length(), seen
    for s, (p, n) in prompts.items():
        assert_same(got[s], alone(model, tok, p, max_tokens=n, temperature=0.0, logprobs=True))
