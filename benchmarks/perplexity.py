"""Held-out perplexity of the demo model: the converter's quality table, and state that is really carried.

    python benchmarks/perplexity.py [--hf .demo_build/hf] [--code-tokens N] [--chat-tokens N] [--append]
    python benchmarks/perplexity.py --hf SRC --variants 3 --doc-tokens 64 --code-tokens 1 --chat-tokens 1 \
        --long-files 1 --long-tokens 64 --chains 1 --reply-tokens 4  (a smoke run: seconds)

1. Quality table: held-out perplexity (code files and chat conversations, full context) of the torch
   source checkpoint (transformers, float32), of `kimi-mlx convert` outputs unquantized (f32, bf16) and
   of every quantization mode and recipe the converter offers, and of the packaged demo.
2. State across chunks: the longest held-out files scored with the full context (state
   carried from chunk to chunk, two chunk sizes) versus cut into independent windows (state reset).
3. Sessions: chains of held-out chat turns run through ChatSession (greedy); the next turn's reference
   reply is scored from the session as it is, after save/load, after an undone extra turn, and from a
   fresh state fed the same tokens. All four must agree.

Held-out data: the files listed in kimi_mlx/demo_data/heldout.json, rebuilt from this machine's
standard library and packages (tools/build_corpus.py; files whose sha256 differs are skipped and
counted). The --hf source checkpoint comes from tools/package_demo.py (`.demo_build/hf`).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kimi_mlx.demo import PACKAGED  # noqa: E402
from kimi_mlx.tokenizer import Tokenizer  # noqa: E402
from kimi_mlx.weights.load import load_model  # noqa: E402

# (label, ConvertOptions keywords); without a dtype the source's (float32 here), as users get by default
VARIANTS = [
    ("f32 (no quantization)", dict()),
    ("bf16 (no quantization)", dict(dtype="bfloat16")),
    *[(f"affine {b}-bit gs64, kimi", dict(bits=b)) for b in (8, 6, 5, 4, 3, 2)],
    ("affine 4-bit gs32, kimi", dict(bits=4, group_size=32)),
    ("affine 4-bit gs64, uniform", dict(bits=4, recipe="uniform")),
    ("affine 3-bit gs64, uniform", dict(bits=3, recipe="uniform")),
    *[(f"{r}", dict(recipe=r)) for r in ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")],
    *[(f"{m}, kimi", dict(mode=m)) for m in ("mxfp8", "mxfp4", "nvfp4")],
]


@dataclass
class Score:
    nll: float = 0.0
    tokens: int = 0
    nbytes: int = 0

    def add(self, other: "Score") -> "Score":
        return Score(self.nll + other.nll, self.tokens + other.tokens, self.nbytes + other.nbytes)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / max(self.tokens, 1))

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / max(self.nbytes, 1)


@dataclass
class Heldout:
    code: list[list[int]]  # sample of whole files (token ids ending in [EOS]) for the quality table
    chat: list[list[int]]  # sample of chat conversations, rendered with the template
    long: list[list[int]]  # the longest files (their first long_tokens), for the state table
    convs: list[list[dict]]  # every held-out conversation (messages)
    missing: int  # listed files absent or different here


def take(docs: list[list[int]], budget: int, seed: int = 0) -> list[list[int]]:
    """Whole documents in a fixed shuffled order until `budget` tokens (0: all)."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    out, n = [], 0
    for i in order:
        if budget and n >= budget:
            break
        out.append(docs[i])
        n += len(docs[i])
    return out


def heldout(tok: Tokenizer, code_tokens: int, chat_tokens: int, n_long: int, long_tokens: int,
            doc_tokens: int = 0) -> Heldout:
    sys.path.insert(0, str(ROOT / "tools"))
    from build_corpus import heldout_documents

    docs, missing = heldout_documents(json.loads((PACKAGED / "heldout.json").read_text())["files"])
    code = [tok.encode(d["text"]) + [tok.eos_id] for d in docs if d["kind"] == "code"]
    convs = [d["messages"] for d in docs if d["kind"] == "chat"]
    chat = [tok.apply_chat_template(m, add_generation_prompt=False, tokenize=True) + [tok.eos_id] for m in convs]
    longest = [d[:long_tokens] for d in sorted(code, key=len)[::-1][:n_long]]
    if doc_tokens:
        code, chat = [d[:doc_tokens] for d in code], [d[:doc_tokens] for d in chat]
    return Heldout(take(code, code_tokens), take(chat, chat_tokens), longest,
                   convs, len(missing))


def token_nll(logits: mx.array, targets) -> float:
    lp = logits.astype(mx.float32)
    lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
    picked = mx.take_along_axis(lp, mx.array(targets)[:, None], axis=-1)
    return -float(picked.sum())


def score(model, tok: Tokenizer, ids: list[int], chunk: int = 512, window: int = 0, state=None) -> Score:
    """-log p of ids[1:] given everything before (from `state` if given), fed `chunk` tokens at a time.

    window > 0: the state is reset every `window` inputs (independent windows; same targets).
    """
    step = min(chunk, window) if window else chunk
    assert not window or window % step == 0
    x, y = ids[:-1], ids[1:]
    state = state if state is not None else model.new_state(1)
    total = 0.0
    for s in range(0, len(x), step):
        if window and s and s % window == 0:
            state = model.new_state(1)
        logits = model(mx.array([x[s : s + step]]), state)[0]
        total += token_nll(logits, y[s : s + step])
    return Score(total, len(y), len(tok.decode_bytes(y)))


def score_all(model, tok, docs, **kw) -> Score:
    out = Score()
    for ids in docs:
        out = out.add(score(model, tok, ids, **kw))
    return out


def score_torch(hf: Path, tok: Tokenizer, docs: list[list[int]], chunk: int = 2048) -> Score:
    """The same scores from transformers' KimiLinearForCausalLM (float32), chunks joined by its cache."""
    import torch
    from transformers import DynamicCache, KimiLinearForCausalLM

    model = KimiLinearForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    out = Score()
    with torch.no_grad():
        for ids in docs:
            x, y = ids[:-1], ids[1:]
            cache, total = DynamicCache(config=model.config), 0.0
            for s in range(0, len(x), chunk):
                logits = model(input_ids=torch.tensor([x[s : s + chunk]]), cache=cache, use_cache=True).logits[0]
                lp = torch.log_softmax(logits.float(), -1)
                total -= float(lp.gather(1, torch.tensor(y[s : s + chunk])[:, None]).sum())
            out = out.add(Score(total, len(y), len(tok.decode_bytes(y))))
    return out


def quality_table(hf: Path, tok, code, chat, variants=VARIANTS) -> list[dict]:
    from kimi_mlx.weights.convert import ConvertOptions, convert

    rows = []

    def row(label, nbytes, sc, sh, seconds):
        rows.append({"variant": label, "MB": nbytes / 1e6, "code_ppl": sc.ppl, "code_bpb": sc.bits_per_byte,
                     "chat_ppl": sh.ppl, "seconds": seconds})
        print(f"{label:32s} {nbytes / 1e6:6.2f} MB  code ppl {sc.ppl:7.3f}  chat ppl {sh.ppl:7.3f}", flush=True)

    t0 = time.perf_counter()
    src_bytes = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
    row("torch source (f32)", src_bytes, score_torch(hf, tok, code), score_torch(hf, tok, chat),
        time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        for label, kw in variants:
            t0 = time.perf_counter()
            out = Path(tmp) / "v"
            res = convert(str(hf), out, ConvertOptions(force=True, report=False, **kw), log=lambda s: None)
            model = load_model(out, dtype=mx.float32)  # stored values exactly, computed in float32
            row(label, res.nbytes, score_all(model, tok, code), score_all(model, tok, chat), time.perf_counter() - t0)
    t0 = time.perf_counter()
    model = load_model(PACKAGED)
    nbytes = sum(f.stat().st_size for f in PACKAGED.glob("*.safetensors"))
    row("packaged demo (8-bit, f32)", nbytes, score_all(model, tok, code), score_all(model, tok, chat),
        time.perf_counter() - t0)
    return rows


def state_table(model, tok, docs) -> list[dict]:
    runs = [("full context, 512-token chunks", dict(chunk=512)), ("full context, 64-token chunks", dict(chunk=64))]
    runs += [(f"independent {w}-token windows", dict(chunk=512, window=w)) for w in (1024, 256, 64)]
    rows = []
    for label, kw in runs:
        sc = score_all(model, tok, docs, **kw)
        rows.append({"run": label, "ppl": sc.ppl, "nll": sc.nll})
        print(f"{label:36s} ppl {sc.ppl:7.3f}", flush=True)
    return rows


def pair_chains(convs: list[list[dict]], n: int, turns: int = 5) -> list[list[tuple[str, str]]]:
    """Chains of `turns` held-out (user, reference reply) pairs, in corpus order."""
    pairs = [(c[i]["content"], c[i + 1]["content"]) for c in convs for i in range(0, len(c), 2)]
    return [pairs[i : i + turns] for i in range(0, len(pairs) - turns + 1, turns)][:n]


def session_table(model, tok, convs, n: int, max_tokens: int = 32) -> dict:
    """Turns 1-3 through ChatSession (greedy); turn 4's reference reply scored four ways; turn 5 is undone.

    The template puts nothing between turns, so turn 4's ids are its own rendering; the first of them is
    fed, not scored (a session's state holds no logits), in every variant alike.
    """
    from kimi_mlx.session import ChatSession

    def run(session, users):
        for u in users:
            for _ in session.send(u):
                pass

    totals = {k: Score() for k in ("session as is", "after save/load", "after undo", "fresh state, same tokens")}
    same_tokens = True
    with tempfile.TemporaryDirectory() as tmp:
        for k, chain in enumerate(pair_chains(convs, n)):
            users = [u for u, _ in chain[:3]]
            cont = tok.apply_chat_template([{"role": "user", "content": chain[3][0]},
                                            {"role": "assistant", "content": chain[3][1]}],
                                           add_generation_prompt=False, tokenize=True)
            s = ChatSession(model, tok, temperature=0.0, max_tokens=max_tokens)
            run(s, users)
            path = Path(tmp) / f"s{k}.safetensors"
            s.save(path)
            loaded = ChatSession.load(path, model, tok)
            u = ChatSession(model, tok, temperature=0.0, max_tokens=max_tokens)
            run(u, users[:2] + [chain[4][0]])
            u.undo()
            run(u, users[2:])
            same_tokens &= u.tokens == s.tokens == loaded.tokens
            fresh = model.new_state(1)
            model(mx.array([s.tokens]), fresh)
            for key, st in zip(totals, (s.state.snapshot(), loaded.state.snapshot(), u.state.snapshot(), fresh)):
                totals[key] = totals[key].add(score(model, tok, cont, state=st))
    out = {k: {"ppl": v.ppl, "nll": v.nll, "tokens": v.tokens} for k, v in totals.items()}
    out["same_tokens"] = same_tokens
    return out


def commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def markdown(args, data: Heldout, quality, state, sessions) -> str:
    n = lambda docs: sum(len(d) - 1 for d in docs)  # noqa: E731 - tokens scored
    lines = [f"### Demo model held-out perplexity — {time.strftime('%Y-%m-%d')} — commit {commit()} — "
             f"{platform.machine()} CPU (2 cores, shared), MLX {mx.__version__}", "",
             f"Source checkpoint `{args.hf.relative_to(ROOT) if args.hf.is_relative_to(ROOT) else args.hf}` "
             f"(tools/package_demo.py) and its conversions. Held-out sample: {len(data.code)} "
             f"{f'files (the first {args.doc_tokens} tokens of each)' if args.doc_tokens else 'whole files'} "
             f"({n(data.code)} tokens scored) and {len(data.chat)} chat conversations ({n(data.chat)} tokens) "
             f"({data.missing} listed files missing here). Full context: MLX fed 512-token chunks with the state "
             "carried; torch 2048-token chunks through its cache. MLX computes in f32 here on the stored values "
             "so rows measure storage and quantization error alone. "
             "`python benchmarks/perplexity.py`", "",
             "| variant | MB | code ppl | code bits/byte | chat ppl |", "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['MB']:.2f} | {r['code_ppl']:.3f} | {r['code_bpb']:.4f} | {r['chat_ppl']:.3f} |"
              for r in quality]
    lines += ["", f"State across chunks, packaged demo: the {len(data.long)} longest held-out files "
              f"(first {args.long_tokens} tokens of each, {n(data.long)} scored); the same targets in every row.", "",
              "| run | ppl |", "|---|---|"]
    lines += [f"| {r['run']} | {r['ppl']:.4f} |" for r in state]
    lines += ["", f"Sessions, packaged demo: {args.chains} chains of held-out chat turns; turns 1-3 through "
              "ChatSession "
              f"(greedy, {args.reply_tokens}-token replies); turn 4's reference reply scored from the resulting state "
              f"(session tokens identical in all runs: {sessions['same_tokens']}).", "",
              "| state | ppl | nll (nats) | tokens |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['ppl']:.6f} | {v['nll']:.4f} | {v['tokens']} |" for k, v in sessions.items()
              if isinstance(v, dict)]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf", type=Path, default=ROOT / ".demo_build" / "hf")
    ap.add_argument("--code-tokens", type=int, default=16000, help="held-out code sample size (0: all)")
    ap.add_argument("--chat-tokens", type=int, default=6000, help="held-out chat sample size (0: all)")
    ap.add_argument("--long-files", type=int, default=2, help="how many of the longest files the state table uses")
    ap.add_argument("--long-tokens", type=int, default=8192, help="of each, the first N tokens")
    ap.add_argument("--chains", type=int, default=8)
    ap.add_argument("--reply-tokens", type=int, default=32, help="the session table's greedy replies, at most")
    ap.add_argument("--variants", type=int, default=0, help="only the first N converter variants (0: all)")
    ap.add_argument("--doc-tokens", type=int, default=0,
                    help="score only the first N tokens of each quality-table document (0: whole documents)")
    ap.add_argument("--append", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    args = ap.parse_args()
    args.hf = args.hf.resolve()
    tok = Tokenizer(PACKAGED)
    if not (args.hf / "config.json").is_file():
        raise SystemExit(f"{args.hf}: no HF checkpoint there; make the demo's source with tools/package_demo.py "
                         "or pass --hf")
    data = heldout(tok, args.code_tokens, args.chat_tokens, args.long_files, args.long_tokens, args.doc_tokens)
    quality = quality_table(args.hf, tok, data.code, data.chat, VARIANTS[: args.variants or None])
    demo = load_model(PACKAGED)
    state = state_table(demo, tok, data.long)
    sessions = session_table(demo, tok, data.convs, args.chains, args.reply_tokens)
    md = markdown(args, data, quality, state, sessions)
    print(md)
    if args.append:
        with (ROOT / "benchmarks" / "RESULTS.md").open("a") as f:
            f.write("\n" + md)


if __name__ == "__main__":
    main()
