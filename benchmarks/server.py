"""Time to first token over a growing conversation, through the HTTP server.

Chat completions (--api chat): a client resends the whole conversation every turn (as OpenAI clients do):
turn k holds k user messages of about --user-tokens tokens each and the k-1 replies, against a server with
the prefix cache and one without.

Responses API (--api responses): the same conversation as a chain, each turn sending only its new user
message with previous_response_id (the server restores the stored response's state), against resending the
whole conversation as input items, to a server with the prefix cache and to one without.

Continuous batching (--api batch): --requests different prompts sent at once (each its own streamed chat
completion, greedy, --batch-tokens tokens each with the end tokens banned so every reply runs its full length)
against the same requests one after another, to one server (--max-batch --requests, no prefix cache), and one
after another to a server whose rows decode through the single-sequence path (a one-at-a-time server's speed);
the replies must be the same every way. The wall time of each way is the best of --repeats, alternating.

Every server runs in this process on 127.0.0.1 over the same model (default: the demo), turn by turn in
lockstep (so that load from other processes hits them alike), and sees the same conversation (the replies
are greedy, so all generate the same ones; checked). --api both (the default) runs both in one run.

  python benchmarks/server.py --turns 10 --user-tokens 1000 --record
  python benchmarks/server.py --api batch --requests 8 --batch-tokens 64 --record
"""

import argparse
import asyncio
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import uvicorn  # noqa: E402

from kimi_mlx import bench  # noqa: E402
from kimi_mlx.loading import load  # noqa: E402
from kimi_mlx.server.app import ServerSettings, create_app  # noqa: E402
from kimi_mlx.server.worker import Engine, EngineSettings  # noqa: E402

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """uvicorn in a thread on a free loopback port; stops when the `with` block ends."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


def user_message(turn: int, n_tokens: int) -> str:
    text = f"Turn {turn}. "
    i = turn
    while len(text) < n_tokens:  # about one token per character with the demo's byte tokenizer
        text += WORDS[i % len(WORDS)] + " "
        i += 7
    return text[:n_tokens]


def one_turn(http: httpx.Client, url: str, messages: list, max_tokens: int) -> dict:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, reply, usage, n_data = None, "", None, 0
    with http.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            n_data += 1
            chunk = json.loads(line[6:])
            if n_data == 2:  # the first chunk after the role chunk carries the first generated token
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                reply += choice["delta"].get("content") or ""
    return {"ttft": ttft, "total": time.perf_counter() - t0, "reply": reply, "prompt": usage["prompt_tokens"],
            "cached": usage["prompt_tokens_details"]["cached_tokens"]}


def one_response(http: httpx.Client, url: str, body: dict) -> dict:
    """A streamed /v1/responses call: TTFT is the time to the first response.output_text.delta event."""
    t0 = time.perf_counter()
    ttft, done = None, None
    with http.stream("POST", url + "/v1/responses", json={**body, "stream": True, "temperature": 0}) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event["type"] == "response.output_text.delta" and ttft is None:
                ttft = time.perf_counter() - t0
            if event["type"] in ("response.completed", "response.incomplete"):
                done = event["response"]
    text = "".join(c["text"] for item in done["output"] if item["type"] == "message" for c in item["content"])
    usage = done["usage"]
    return {"ttft": ttft or time.perf_counter() - t0, "total": time.perf_counter() - t0, "reply": text,
            "id": done["id"], "prompt": usage["input_tokens"], "cached": usage["input_tokens_details"]["cached_tokens"]}


def responses_chain(model, tok, turns: int, user_tokens: int, max_tokens: int) -> tuple[list, list, list]:
    """Rows for: the chain (previous_response_id), the whole conversation resent to a server with the prefix
    cache, and resent to one without."""
    engines = [Engine(model, tok, EngineSettings(prefix_cache_bytes=b)) for b in (4 << 30, 4 << 30, 0)]
    rows: tuple[list, list, list] = ([], [], [])
    instructions = "You are a helpful assistant."
    with LocalServer(create_app(engines[0], ServerSettings("bench"))) as chain, \
            LocalServer(create_app(engines[1], ServerSettings("bench"))) as resend, \
            LocalServer(create_app(engines[2], ServerSettings("bench"))) as cold, httpx.Client(timeout=600) as http:
        for url in (chain, resend, cold):
            one_response(http, url, {"input": "warm up", "max_output_tokens": 4, "store": False})
        history, previous = [], None
        for k in range(1, turns + 1):
            message = user_message(k, user_tokens)
            history.append({"role": "user", "content": message})
            base = {"instructions": instructions, "max_output_tokens": max_tokens}
            rows[0].append(one_response(http, chain, {**base, "input": message, "previous_response_id": previous}))
            previous = rows[0][-1]["id"]
            for url, out in ((resend, rows[1]), (cold, rows[2])):
                out.append(one_response(http, url, {**base, "input": history, "store": False}))
            history.append({"role": "assistant", "content": rows[0][-1]["reply"]})
    return rows


def conversations(model, tok, turns: int, user_tokens: int, max_tokens: int) -> tuple[list, list]:
    """The same conversation against a server with the prefix cache and one without, turn by turn in lockstep
    (so that load from other processes hits both alike)."""
    engines = [Engine(model, tok, EngineSettings(prefix_cache_bytes=b)) for b in (4 << 30, 0)]
    rows: tuple[list, list] = ([], [])
    with LocalServer(create_app(engines[0], ServerSettings("bench"))) as on, \
            LocalServer(create_app(engines[1], ServerSettings("bench"))) as off, httpx.Client(timeout=600) as http:
        for url in (on, off):
            one_turn(http, url, [{"role": "user", "content": "warm up"}], 4)
        messages = [{"role": "system", "content": "You are a helpful assistant."}]
        for k in range(1, turns + 1):
            messages.append({"role": "user", "content": user_message(k, user_tokens)})
            for url, out in zip((on, off), rows):
                out.append(one_turn(http, url, messages, max_tokens))
            messages.append({"role": "assistant", "content": rows[0][-1]["reply"]})
    return rows


def batch_stream(http: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, ban: dict) -> "asyncio.Future":
    async def run():
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "logit_bias": ban}
        text = ""
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:]).get("choices", []):
                        text += choice["delta"].get("content") or ""
        return text

    return run()


def concurrent_vs_sequential(model, tok, requests: int, prompt_tokens: int, max_tokens: int,
                             repeats: int) -> dict:
    """Wall times of `requests` streamed chat completions sent at once and sent one by one (best of
    `repeats`, alternating), to one server batching up to `requests` rows; and one by one to a server whose
    rows decode through the single-sequence path (BatchGenerator's sequential reference: a one-at-a-time
    server's speed). The replies of every way are returned."""
    from kimi_mlx.batch import BatchGenerator

    engines = [Engine(model, tok, EngineSettings(prefix_cache_bytes=0, max_batch=requests)) for _ in range(2)]
    engines[1].batch = BatchGenerator(model, tok, max_batch=requests, reference=True)
    prompts = [f"Request {i}: " + user_message(i + 1, prompt_tokens) for i in range(requests)]
    ban = {str(i): -100 for i in (tok.im_end_id, tok.eos_id, *model.config.eos_token_ids)}

    async def every_way(url, single_url):
        async with httpx.AsyncClient(timeout=600) as http:
            for u in (url, single_url):
                await batch_stream(http, u, "warm up", 4, ban)
            times = {"concurrent": [], "sequential": [], "single": []}
            replies = {}
            for _ in range(repeats):
                t0 = time.perf_counter()
                replies["concurrent"] = await asyncio.gather(*(batch_stream(http, url, p, max_tokens, ban)
                                                               for p in prompts))
                times["concurrent"].append(time.perf_counter() - t0)
                for way, u in (("sequential", url), ("single", single_url)):
                    t0 = time.perf_counter()
                    replies[way] = [await batch_stream(http, u, p, max_tokens, ban) for p in prompts]
                    times[way].append(time.perf_counter() - t0)
            return times, replies

    with LocalServer(create_app(engines[0], ServerSettings("bench"))) as url, \
            LocalServer(create_app(engines[1], ServerSettings("bench"))) as single_url:
        times, replies = asyncio.run(every_way(url, single_url))
    return {**{way: min(t) for way, t in times.items()}, "replies": replies}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo", help="checkpoint directory, hub repo id, or 'demo'")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--user-tokens", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--api", choices=("chat", "responses", "batch", "both", "all"), default="all",
                    help="both: chat and responses; all: those and batch")
    ap.add_argument("--requests", type=int, default=8, help="batch: requests sent at once")
    ap.add_argument("--batch-prompt-tokens", type=int, default=64, help="batch: characters of each prompt")
    ap.add_argument("--batch-tokens", type=int, default=64, help="batch: tokens each reply generates")
    ap.add_argument("--repeats", type=int, default=2, help="batch: runs of each way (the best is kept)")
    ap.add_argument("--record", action="store_true", help="append to benchmarks/RESULTS.md")
    a = ap.parse_args()
    model, tok = load(a.model)
    cfg = model.config
    head = (f"device: {bench.device_line()} | "
            f"model: {a.model} (hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {model.dtype}) | "
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    shape = (f"{a.turns} turns, user messages of {a.user_tokens} characters, {a.max_tokens}-token greedy replies, "
             "streamed")
    sections = []
    if a.api in ("chat", "both", "all"):
        with_cache, without = conversations(model, tok, a.turns, a.user_tokens, a.max_tokens)
        lines = [head, "chat completions, the whole conversation resent each turn: " + shape,
                 " turn | prompt tok | cached tok | TTFT cache on | TTFT cache off | speed-up"]
        for k, (on, off) in enumerate(zip(with_cache, without), 1):
            assert on["reply"] == off["reply"], f"turn {k}: the replies differ with and without the cache"
            lines.append(f" {k:4d} | {on['prompt']:10,d} | {on['cached']:10,d} | {on['ttft'] * 1e3:10.0f} ms "
                         f"| {off['ttft'] * 1e3:11.0f} ms | {off['ttft'] / on['ttft']:7.1f}x")
        total_on, total_off = sum(r["ttft"] for r in with_cache), sum(r["ttft"] for r in without)
        lines.append(f"sum of TTFT: {total_on:.2f} s with the prefix cache, {total_off:.2f} s without")
        print("\n".join(lines), flush=True)
        sections.append(("server: TTFT over a growing conversation", lines))
    if a.api in ("responses", "both", "all"):
        chain, resend, cold = responses_chain(model, tok, a.turns, a.user_tokens, a.max_tokens)
        lines = [head, "Responses API: " + shape,
                 " turn | input tok | chain: cached |  TTFT | resent: cached |  TTFT | resent, no cache: TTFT "
                 "| chain vs no cache"]
        for k, (c, r, o) in enumerate(zip(chain, resend, cold), 1):
            assert c["reply"] == r["reply"] == o["reply"], f"turn {k}: the replies differ"
            assert c["prompt"] == r["prompt"] == o["prompt"], f"turn {k}: the prompts differ"
            lines.append(f" {k:4d} | {c['prompt']:9,d} | {c['cached']:13,d} | {c['ttft'] * 1e3:4.0f} ms "
                         f"| {r['cached']:14,d} | {r['ttft'] * 1e3:4.0f} ms | {o['ttft'] * 1e3:19.0f} ms "
                         f"| {o['ttft'] / c['ttft']:16.1f}x")
        sums = [sum(x["ttft"] for x in rows) for rows in (chain, resend, cold)]
        lines.append(f"sum of TTFT: {sums[0]:.2f} s chained with previous_response_id, {sums[1]:.2f} s resent "
                     f"with the prefix cache, {sums[2]:.2f} s resent without")
        print("\n".join(lines), flush=True)
        sections.append(("server: Responses API chain (previous_response_id) vs resending the conversation", lines))
    if a.api in ("batch", "all"):
        r = concurrent_vs_sequential(model, tok, a.requests, a.batch_prompt_tokens, a.batch_tokens, a.repeats)
        got = r["replies"]
        assert got["concurrent"] == got["sequential"] == got["single"], "the replies differ batched and alone"
        n_tokens = a.requests * a.batch_tokens
        rate = lambda way: f"{r[way]:.2f} s ({n_tokens / r[way]:.1f} tok/s)"  # noqa: E731
        lines = [head, f"continuous batching: {a.requests} streamed chat completions (prompts of "
                       f"{a.batch_prompt_tokens} characters, {a.batch_tokens}-token greedy replies) to one server "
                       f"(--max-batch {a.requests}, no prefix cache), best of {a.repeats}; the single-sequence "
                       "decode: one by one to a server whose rows step alone (the sequential reference)",
                 f"{a.requests} concurrent requests: {rate('concurrent')} | one by one: {rate('sequential')} | "
                 f"one by one, single-sequence decode: {rate('single')} | concurrent / one by one: "
                 f"{r['concurrent'] / r['sequential']:.2f}x, / single-sequence one by one: "
                 f"{r['concurrent'] / r['single']:.2f}x"]
        print("\n".join(lines), flush=True)
        sections.append(("server: concurrent requests (continuous batching) vs one by one", lines))
    if a.record:
        from results import Recorder

        for title, lines in sections:
            Recorder().append(title, lines)


if __name__ == "__main__":
    main()
    # End without interpreter finalization. The engines' threads ran compiled MLX functions, and MLX frees a
    # thread's compile cache in that thread's C++ thread-local destructors, which take the GIL: a thread still
    # running them (they follow Thread.join) while the interpreter finalizes is ended by CPython with
    # pthread_exit inside a noexcept destructor, and the C++ runtime aborts the process ("terminate called
    # without an active exception", exit status 134) after every result was printed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
