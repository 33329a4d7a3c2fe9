"""Speculative decoding of many rows at once (spec_batch.py): the batched verification forward against each
sequence's own verification, per-slot rollback, and batch_generate / stream_batch / generate --n with draft='ngram'
against plain decoding (greedy: identical text; seeded sampling: a row's stream does not depend on its company)."""

import mlx.core as mx
import numpy as np
import pytest

from kimi_mlx import settings
from kimi_mlx.batch import batch_generate, stream_batch
from kimi_mlx.batch_state import BatchState
from kimi_mlx.errors import KimiError
from kimi_mlx.feed import prefill
from kimi_mlx.model.verify import verify_batch, verify_forward
from kimi_mlx.state_io import rewind
from test_speculative import CODE, COPY, demo, on_the_cpu, states_equal  # noqa: F401 (fixtures: the CPU, the demo)

PROMPTS = [COPY, "Once upon a time", CODE, COPY[:150], CODE * 2]


@pytest.fixture
def always_draft():
    """Draft the most tokens every round: the CPU's cost model drafts little on the demo's text, and these tests
    are about the rounds that do."""
    with settings.override(KIMI_MLX_DRAFT_WIDTH="max"):
        yield


def test_batched_verification_equals_each_sequence_alone(demo_random):
    """Three sequences at their own lengths (one slot left free between them), T = 5 rows each: every slot's
    logits are its own verification's, and keeping 1, 3 or 5 rows leaves each slot the state its own
    verification leaves rewound to that row."""
    model, _ = demo_random
    rng = np.random.default_rng(0)
    batch = BatchState(model, max_batch=4)
    alone, slots = [], []
    for n in (9, 30, 17, 4):
        s = model.new_state(1)
        prefill(model, s, rng.integers(0, 256, n).tolist())
        slots.append(batch.add(s))
        alone.append(s)
    batch.free(slots[3])  # a free slot computes on padding and keeps nothing
    alone, slots = alone[:3], slots[:3]
    T, kept = 5, [1, 3, 5]
    tokens = rng.integers(0, 256, (batch.capacity, T))
    offsets = [s.offset for s in alone]
    logits, after = verify_batch(model, mx.array(tokens, mx.uint32), batch)
    keep = [1] * batch.capacity
    for b, k in zip(slots, kept):
        keep[b] = k
    batch.keep(keep, after)
    for s, b, k, off in zip(alone, slots, kept, offsets):
        want, marks = verify_forward(model, tokens[b].tolist(), s)
        assert mx.array_equal(logits[b], want).item(), b
        rewind(s, marks[k - 1])
        got = batch.extract(b, batch.mark(), off + k)
        assert states_equal(got, s), b


def test_greedy_rows_with_drafts_are_plain_decodings_text(demo, always_draft):
    """Ragged prompts, copy-heavy and not, more prompts than rows (rows join as others leave), two samples of one
    prompt: the text with drafts is the text without, and the copy-heavy rows did keep drafts."""
    model, tok = demo
    opts = dict(max_tokens=40, temperature=0.0, max_batch=3)
    plain = batch_generate(model, tok, PROMPTS, **opts)
    last, drafted = {}, set()
    texts = [""] * len(PROMPTS)
    for i, r in stream_batch(model, tok, PROMPTS, draft="ngram", **opts):
        texts[i] += r.text
        last[i] = r
        if r.from_draft:
            drafted.add(i)
    assert texts == plain
    assert 0 in drafted and last[0].spec.tokens_per_forward > 1
    two = batch_generate(model, tok, [COPY], n=2, draft="ngram", **opts)
    assert two == [plain[0], plain[0]]


@pytest.mark.parametrize("width", ["auto", "max"])
def test_penalties_and_plain_rounds_keep_plain_decodings_text(demo, width):
    """A repetition penalty (each row's processors see exactly its kept tokens), and the cost-aware width, which on
    a CPU drafts nothing: every round is a plain one, queued before its tokens are read."""
    model, tok = demo
    opts = dict(max_tokens=30, temperature=0.0, repetition_penalty=1.3, max_batch=4)
    plain = batch_generate(model, tok, PROMPTS[:4], **opts)
    with settings.override(KIMI_MLX_DRAFT_WIDTH=width):
        assert batch_generate(model, tok, PROMPTS[:4], draft="ngram", **opts) == plain


def test_stops_and_max_tokens_inside_an_accepted_run(demo, always_draft):
    """A stop string taken from the middle of the plain reply and a max_tokens that ends inside a run of accepted
    drafts end the rows where plain decoding ends them."""
    model, tok = demo
    full = batch_generate(model, tok, [COPY], max_tokens=40, temperature=0.0)[0]
    stop = full[20:24]
    for extra in (dict(stop=[stop]), dict(max_tokens=13)):
        opts = dict(max_tokens=40, temperature=0.0) | extra
        plain = batch_generate(model, tok, [COPY, CODE], **opts)
        assert batch_generate(model, tok, [COPY, CODE], draft="ngram", **opts) == plain, extra


def test_seeded_sampling_row_does_not_depend_on_its_company(demo, always_draft):
    model, tok = demo
    opts = dict(max_tokens=24, temperature=0.8, seed=7, draft="ngram")
    alone = batch_generate(model, tok, [COPY], **opts)[0]
    together = batch_generate(model, tok, [COPY, CODE, "Once upon a time"], **opts)
    assert together[0] == alone
    assert batch_generate(model, tok, [COPY, CODE, "Once upon a time"], **opts) == together


def test_a_draft_model_or_the_reference_with_a_draft_is_a_one_line_error(demo):
    model, tok = demo
    with pytest.raises(KimiError, match="prompt lookup only"):
        batch_generate(model, tok, [CODE], draft="demo", max_tokens=4)
    with pytest.raises(KimiError, match="reference"):
        batch_generate(model, tok, [CODE], draft="ngram", reference=True, max_tokens=4)


def test_cli_samples_with_a_draft_print_plain_decodings_samples_and_the_summed_draft_stats():
    import re

    from typer.testing import CliRunner

    from kimi_mlx.cli import app

    args = ["generate", "--model", "demo", "--raw", "--prompt", COPY, "--temp", "0", "--max-tokens", "24", "--n", "2",
            "--verbose"]
    plain = CliRunner().invoke(app, args)
    with settings.override(KIMI_MLX_DRAFT_WIDTH="max"):
        spec = CliRunner().invoke(app, [*args, "--draft", "ngram"])
    assert plain.exit_code == spec.exit_code == 0, spec.stderr
    assert spec.stdout == plain.stdout and spec.stdout.count("[sample") == 2
    found = re.search(r"draft: (\d+) drafted, (\d+) accepted", spec.stderr)
    assert found and int(found[2]) > 0


def test_rows_leaving_before_a_round_shrink_the_batch_under_it(demo, always_draft):
    """Three of four rows finish as a round begins (the batch then shrinks to the one left in slot 0): the round
    runs at the shrunk size, and the row left goes on as plain decoding does."""
    from kimi_mlx.generate import GenerationOptions
    from kimi_mlx.spec_batch import SpecBatch

    model, tok = demo
    ids = tok.encode(COPY)
    gen = SpecBatch(model, tok, max_batch=4)
    for max_tokens in (30, 3, 3, 3):
        state = model.new_state(1)
        prefill(model, state, ids[:-1])
        gen.insert(state, ids[-1], GenerationOptions(max_tokens=max_tokens, temperature=0.0, draft="ngram"),
                   context_tail=ids[:-1])
    text = ""
    while gen.running:
        for seq, r in gen.step():
            text += r.text if seq == 0 else ""
    assert text == batch_generate(model, tok, [COPY], max_tokens=30, temperature=0.0)[0]


def test_logprobs_of_drafted_tokens_are_plain_decodings(demo, always_draft):
    """Each token's logprob and top logprobs, drafted or not, are those plain batched decoding reports for it."""
    model, tok = demo

    def run(**kw):
        out = {}
        for i, r in stream_batch(model, tok, [COPY, CODE], max_tokens=24, temperature=0.0, logprobs=True,
                                 top_logprobs=3, **kw):
            out.setdefault(i, []).append((r.token, r.logprob, [t for t, _ in r.top_logprobs], r.from_draft))
        return out

    plain, spec = run(), run(draft="ngram")
    assert any(d for rows in spec.values() for *_, d in rows)
    for i in plain:
        assert [(t, top) for t, _, top, _ in spec[i]] == [(t, top) for t, _, top, _ in plain[i]]
        assert [a[1] for a in spec[i]] == [b[1] for b in plain[i]], i  # (bit for bit on the CPU)
