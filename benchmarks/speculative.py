"""Speculative decoding: tokens/s and tokens per forward with and without drafts, and what a verification
forward of T = 2, 4, 8, 16 tokens costs against one decode step.

Tasks (greedy, on --model, the trained demo by default): a copy-heavy one (rewrite a given function with one
change) and a free one (write something new). Each runs plain, with --draft ngram, and with each --draft-model.
The verification table uses random weights at --shape (random weights accept nothing, so only the cost is
measured there): after a --context prefill, the median time of one decode step (the compiled one-token path)
against model/verify.py's verify_forward of T tokens (k = T - 1 drafts and the token before them) and against
the prefill path over the same T tokens.

  python benchmarks/speculative.py --model none --shape full --context 1024 --rows-kernel --record
                                                                       (GPU: the verification cost)
  python benchmarks/speculative.py --max-tokens 200 --shape small --record        (CPU: the demo's tasks)
  python benchmarks/speculative.py --shape none --beside       (a speculative turn beside a plain one, server engine)
  python benchmarks/speculative.py --model none --shape full --batch 8 --ks 2,4,8   (GPU: a batched verification's cost)
  python benchmarks/speculative.py --shape none --batch 8 --dtype bfloat16      (GPU: the demo's tasks, 1 and 8 rows)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402

from results import Recorder  # noqa: E402

FUNCTION = '''def summarize(records, key="value", limit=None):
    """Mean, minimum and maximum of one field over a list of dict records, skipping missing values."""
    values = []
    for record in records:
        if key not in record or record[key] is None:
            continue
        values.append(float(record[key]))
        if limit is not None and len(values) >= limit:
            break
    if not values:
        return {"count": 0, "mean": None, "min": None, "max": None}
    total = 0.0
    for v in values:
        total += v
    return {"count": len(values), "mean": total / len(values), "min": min(values), "max": max(values)}
'''
TASKS = {
    "copy-heavy": FUNCTION + "\n\n# The same function with `key` renamed to `field`:\n" + FUNCTION.split("(")[0] + "(",
    "free": "# A small command-line tool that counts the words in a file\nimport sys\n\n\ndef main():\n",
}


def ints(s):
    return tuple(int(x) for x in s.split(",") if x)


def run_task(model, tok, prompt: str, max_tokens: int, draft: str | None, num_draft: int) -> tuple[float, float, str]:
    """(generated tok/s after the first token, tokens per target forward, the text)."""
    from kimi_mlx.generate import stream_generate

    kw = dict(max_tokens=max_tokens, temperature=0.0)
    if draft:
        kw.update(draft=draft, num_draft=num_draft)
    rs = list(stream_generate(model, tok, prompt, **kw))
    per_forward = rs[-1].spec.tokens_per_forward if rs[-1].spec else 1.0
    return rs[-1].generation_tps, per_forward, "".join(r.text for r in rs)


def batch_tasks(model, tok, B: int, max_tokens: int, rounds: int, echo) -> None:
    """B rows at once, the tasks alternating (half of them copy-heavy), through stream_batch without and with
    draft='ngram' (spec_batch.py): generated tokens/s over all rows (after the first round of tokens), tokens a
    forward per row, and whether every row's text is plain decoding's."""
    from kimi_mlx.batch import stream_batch

    prompts = [list(TASKS.values())[b % len(TASKS)] for b in range(B)]

    def once(draft):
        texts, last, first, n = [""] * B, {}, None, 0
        for i, r in stream_batch(model, tok, prompts, max_batch=B, max_tokens=max_tokens, temperature=0.0,
                                 **(dict(draft=draft) if draft else {})):
            first = first or time.perf_counter()
            texts[i] += r.text
            last[i] = r
            n += 1
        per = statistics.mean(r.spec.tokens_per_forward for r in last.values()) if draft else 1.0
        return (n - B) / (time.perf_counter() - first), per, texts

    once(None)  # warm: traces the batch's steps
    runs = {d: [once(d) for _ in range(rounds)] for d in (None, "ngram")}
    base, _, text = max(runs[None])
    echo(f"batch {B} (half copy-heavy), greedy, {max_tokens} tokens a row, best of {rounds}")
    echo("| draft | tok/s, all rows | x plain | tokens/forward a row | same text |")
    echo("|---|---|---|---|---|")
    for d in (None, "ngram"):
        tps, per, got = max(runs[d])
        echo(f"| {d or 'none'} | {tps:.1f} | {tps / base:.2f} | {per:.2f} | {'yes' if got == text else 'NO'} |")


def beside(model, tok, max_tokens: int, rounds: int, echo) -> None:
    """The server's engine (no HTTP) with two turns submitted at once: the copy-heavy task (plain, then with
    --draft ngram) and a plain companion turn of max_tokens // 4 tokens. Seconds from submission to each turn's first
    and last token, the best of `rounds` alternating: whether a speculative turn holds the batch's rows back."""
    import threading

    from kimi_mlx.generate import GenerationOptions
    from kimi_mlx.server.worker import Engine, EngineSettings, Failed, Finished, Piece, TurnSpec

    ban = {tok.im_end_id: -100.0, tok.eos_id: -100.0}  # every reply runs its full length

    def turn(text, n, **kw):
        opts = GenerationOptions.from_kwargs(temperature=0.0, max_tokens=n, logit_bias=ban, **kw)
        return TurnSpec(tok.encode(text), opts)

    def once(draft) -> dict:
        engine = Engine(model, tok, EngineSettings(prefix_cache_bytes=0))
        marks, done = {}, [threading.Event(), threading.Event()]
        t0 = time.perf_counter()

        def sink(i):
            def f(ev):
                if isinstance(ev, Piece):
                    marks.setdefault((i, "first"), time.perf_counter() - t0)
                elif isinstance(ev, (Finished, Failed)):
                    marks[(i, "last")] = time.perf_counter() - t0
                    done[i].set()
            return f

        engine.start()
        try:
            engine.submit(turn(TASKS["copy-heavy"], max_tokens, **({"draft": draft} if draft else {})), sink(0))
            engine.submit(turn(TASKS["free"], max(1, max_tokens // 4)), sink(1))
            for d in done:
                d.wait(600)
        finally:
            engine.stop()
        return marks

    runs = {d: [] for d in (None, "ngram")}
    for _ in range(rounds):
        for d in runs:
            runs[d].append(once(d))
    echo(f"the server's engine, two turns at once: copy-heavy ({max_tokens} tokens) and a plain free-task turn "
         f"({max(1, max_tokens // 4)} tokens); seconds from submission, best of {rounds}")
    echo("| copy-heavy turn | its first token | its last | plain turn's first token | its last |")
    echo("|---|---|---|---|---|")
    for d, ms in runs.items():
        best = {k: min(m[k] for m in ms) for k in ms[0]}
        echo(f"| {d or 'plain'} | {best[(0, 'first')]:.2f} | {best[(0, 'last')]:.2f} | {best[(1, 'first')]:.2f} | "
             f"{best[(1, 'last')]:.2f} |")


def median_ms(f, reps: int) -> float:
    f()  # warm: traces and compiles
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def batch_verification_costs(model, state, B: int, ks, reps: int, echo) -> None:
    """B slots each holding `state`: one batched decode step (model.decode_rows) against a batched verification
    of T tokens a slot (model/verify.verify_batch, each slot keeping all T). The ratio is how many tokens a
    forward each row must gain for a batched speculative round to pay."""
    from kimi_mlx.batch_state import BatchState
    from kimi_mlx.model.verify import verify_batch
    from kimi_mlx.spec_batch import MAX_ROWS

    batch = BatchState(model, max_batch=B)
    for _ in range(B):
        batch.add(state)
    start = batch.mark()
    vocab = model.config.vocab_size
    toks = mx.random.randint(0, vocab, (B, max(ks)), dtype=mx.uint32)

    def reset():
        batch.restore(start)

    def step():
        reset()
        batch.prepare()
        mx.eval(model.decode_rows(toks[:, :1], batch))
        batch.advance()
        batch.eval()

    def verify(T):
        def f():
            reset()
            logits, after = verify_batch(model, toks[:, :T], batch)
            batch.keep([T] * B, after)
            mx.eval(logits)
            batch.eval()
        return f

    one = median_ms(step, reps)
    echo(f"batch {B}: one batched decode step {one:.2f} ms")
    echo("| T (k + 1) | batched verify ms | x batched step |")
    echo("|---|---|---|")
    for T in ks:
        if B * T <= MAX_ROWS:  # (wider verifications are never run)
            v = median_ms(verify(T), reps)
            echo(f"| {T} | {v:.2f} | {v / one:.2f} |")


def verification_costs(shape: str, context: int, ks, reps: int, bits: int, echo, rows_kernel: bool = False,
                       batch: int = 0) -> None:
    from kimi_mlx import bench, settings
    from kimi_mlx.feed import prefill
    from kimi_mlx.model.verify import verify_forward
    from kimi_mlx.state_io import mark, rewind

    model, _, _ = bench.build(shape, bits, dtype=bench.activation_dtype(), peer=False)
    vocab = model.config.vocab_size
    state = model.new_state(1)
    prefill(model, state, mx.random.randint(0, vocab, (context,)).tolist())
    at = mark(state)
    toks = mx.random.randint(0, vocab, (max(ks),)).tolist()

    def decode():
        rewind(state, at)
        mx.eval(model(mx.array([toks[:1]]), state))
        state.eval()

    def verify(T):
        def f():
            rewind(state, at)
            logits, marks = verify_forward(model, toks[:T], state)
            mx.eval(logits, [m.layers for m in marks])
        return f

    def prefill_path(T):
        def f():
            rewind(state, at)
            mx.eval(model(mx.array([toks[:T]]), state))
            state.eval()
        return f

    def with_rows_kernel(f):
        def g():
            with settings.override(KIMI_MLX_KDA_ROWS="on"):
                f()
        return g

    one = median_ms(decode, reps)
    echo(f"verification at shape {shape}, {bits or 'no'}-bit weights, context {context}: one decode step {one:.2f} ms")
    rows_head = " verify, KIMI_MLX_KDA_ROWS=on ms | x decode step |" if rows_kernel else ""
    echo(f"| T (k + 1) | verify ms | x decode step | prefill path ms | x decode step |{rows_head}")
    echo("|---|---|---|---|---|" + ("---|---|" if rows_kernel else ""))
    for T in ks:
        v, p = median_ms(verify(T), reps), median_ms(prefill_path(T), reps)
        line = f"| {T} | {v:.2f} | {v / one:.2f} | {p:.2f} | {p / one:.2f} |"
        if rows_kernel:  # the compiled verification steps are traced again under the switch, and after it
            model.retrace()
            r = median_ms(with_rows_kernel(verify(T)), reps)
            model.retrace()
            line += f" {r:.2f} | {r / one:.2f} |"
        echo(line)
    if batch:
        rewind(state, at)
        batch_verification_costs(model, state, batch, ks, reps, echo)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo", help="checkpoint for the text tasks ('none' to skip them)")
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--num-draft", type=int, default=0, help="0: each draft's default")
    ap.add_argument("--draft-model", action="append", default=[], help="also run with this draft model")
    ap.add_argument("--shape", default="small", help="random-weight shape of the verification table ('none': skip)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--ks", type=ints, default=(3, 5, 9, 16), help="verification widths T: k drafts + 1 (at most 16)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3, help="runs of each task and draft, alternating (best kept)")
    ap.add_argument("--rows-kernel", action="store_true", help="also time the verification with KIMI_MLX_KDA_ROWS=on "
                    "(one kda_decode_rows launch a KDA layer; a GPU only)")
    ap.add_argument("--beside", action="store_true", help="also time a plain turn submitted with a speculative one "
                    "to the server's engine (and with the same turn plain)")
    ap.add_argument("--batch", type=int, default=0, help="also run B rows at once (spec_batch.py): the tasks "
                    "through stream_batch, and the verification table's batched step against a batched verification")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="cast --model's floating weights to this dtype (default: the checkpoint's; on a CUDA image "
                         "whose MLX cannot build the float32 quantized matmul, bfloat16 runs the demo)")
    ap.add_argument("--record", action="store_true", help="append to benchmarks/RESULTS.md")
    a = ap.parse_args()
    from kimi_mlx import bench

    echo = Recorder()
    echo(bench.device_line() + (f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
                                if mx.default_device() == mx.cpu else ""))
    if a.model != "none":
        from kimi_mlx.loading import resolve
        from kimi_mlx.tokenizer import Tokenizer
        from kimi_mlx.weights.load import load_model

        path = resolve(a.model)
        model, tok = load_model(path, dtype=getattr(mx, a.dtype) if a.dtype else None), Tokenizer(path)
        run_task(model, tok, "warm up", 4, None, 0)
        echo(f"greedy, {a.max_tokens} tokens, model {a.model}, best of {a.rounds} alternating rounds")
        echo("| task | draft | tok/s | x plain | tokens/forward | same text |")
        echo("|---|---|---|---|---|---|")
        for name, prompt in TASKS.items():
            drafts = [None, "ngram", *a.draft_model]
            runs = {d: [] for d in drafts}
            for _ in range(a.rounds):  # the drafts alternate, so a load change on a shared machine hits them alike
                for d in drafts:
                    runs[d].append(run_task(model, tok, prompt, a.max_tokens, d, a.num_draft))
            base, _, text = max(runs[None])
            for d in drafts:
                tps, per, got = max(runs[d])
                same = "yes" if got == text else "NO"
                echo(f"| {name} | {d or 'none'} | {tps:.1f} | {tps / base:.2f} | {per:.2f} | {same} |")
        if a.beside:
            beside(model, tok, a.max_tokens, a.rounds, echo)
        if a.batch:
            batch_tasks(model, tok, a.batch, a.max_tokens, a.rounds, echo)
    if a.shape != "none":
        verification_costs(a.shape, a.context, a.ks, a.reps, a.bits, echo, a.rows_kernel, a.batch)
    if a.record:
        echo.append("speculative decoding")


if __name__ == "__main__":
    main()
