"""`kimi-mlx serve --model demo` in a subprocess on 127.0.0.1, driven by the real `openai` client:
chat and completions, streamed and whole, forced tool calls and their results, JSON output, prefix-state
reuse across turns (with logits equal to a fresh prefill), 16 concurrent streams, disconnects."""

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time

import httpx
import mlx.core as mx
import numpy as np

from kimi_mlx.chat_template import TokenIds
import pytest

openai = pytest.importorskip("openai")

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "weather in a city", "parameters": {
        "type": "object", "properties": {"unit": {"enum": ["c", "f"]}, "days": {"type": "integer", "minimum": 1,
                                                                                "maximum": 7}},
        "required": ["unit", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "ping", "parameters": {
        "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}}},
]
BOOL_SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
    "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}}}


class Server:
    def __init__(self, proc, port, log):
        self.proc, self.port, self.log = proc, port, log
        self.url = f"http://127.0.0.1:{port}"

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0,
                             timeout=60, **kw)

    def health(self, timeout=5.0) -> dict:
        return httpx.get(self.url + "/health", timeout=timeout).json()

    def wait_idle(self, limit_s: float) -> float:
        """Seconds until the engine has nothing running or waiting (fails past limit_s)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit_s:
            h = self.health()
            if not h["busy"] and h["waiting"] == 0:
                return time.monotonic() - t0
            time.sleep(0.05)
        raise AssertionError(f"server still busy after {limit_s} s: {self.health()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def no_stop_bias() -> dict[str, float]:
    """logit_bias that keeps the (trained) demo from ending a reply: for turns that must run long."""
    from kimi_mlx.loading import resolve
    from kimi_mlx.tokenizer import Tokenizer

    tok = Tokenizer(resolve("demo"))
    return {str(i): -100 for i in (tok.im_end_id, tok.eos_id)}


def start_server(tmp_path, *args, ready_s: float = 60.0) -> Server:
    port = free_port()
    log = open(tmp_path / f"server-{port}.log", "w")
    env = {**os.environ, "KIMI_MLX_CACHE": os.environ["KIMI_MLX_CACHE"]}
    proc = subprocess.Popen([sys.executable, "-m", "kimi_mlx", "serve", "--model", "demo", "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "warning", *args], stdout=log, stderr=log, env=env)
    server = Server(proc, port, log)
    t0 = time.monotonic()
    while time.monotonic() - t0 < ready_s:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {(tmp_path / f'server-{port}.log').read_text()}")
        try:
            if server.health(timeout=1.0)["status"] == "ok":
                return server
        except httpx.HTTPError:
            time.sleep(0.1)
    stop_server(server)
    raise AssertionError("server did not start in time")


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(10)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(5)
    server.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("server"), "--prefill-step-size", "512")
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def demo():
    from kimi_mlx.loading import load

    return load("demo")


def user(text):
    return [{"role": "user", "content": text}]


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["demo"]
    h = server.health()
    assert h["status"] == "ok" and h["model"] == "demo" and "prefix_cache" in h


def test_chat_whole_and_streamed_agree(server):
    c = server.client()
    whole = c.chat.completions.create(model="demo", messages=user("hello"), max_tokens=8, temperature=0)
    choice = whole.choices[0]
    assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)
    assert whole.usage.completion_tokens >= 1 and whole.usage.prompt_tokens > 5
    stream = c.chat.completions.create(model="demo", messages=user("hello"), max_tokens=8, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert text == choice.message.content and finishes == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again


def test_completions_with_logprobs(server):
    c = server.client()
    r = c.completions.create(model="demo", prompt="Once upon", max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == r.usage.completion_tokens == 4
    assert all(len(top) >= 1 for top in lp.top_logprobs) and all(v <= 0 for v in lp.token_logprobs)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="demo", prompt="Once upon", max_tokens=4, temperature=0, stream=True))
    assert streamed == r.choices[0].text


def test_forced_named_tool_call_and_its_result_turn(server):
    c = server.client()
    messages = user("What is the weather in Paris?")
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = c.chat.completions.create(model="demo", messages=messages, tools=TOOLS, tool_choice=choice, max_tokens=64,
                                  parallel_tool_calls=False)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
    (call,) = msg.tool_calls
    assert call.function.name == "get_weather" and re.fullmatch(r"call_[A-Za-z0-9]{24}", call.id)
    args = json.loads(call.function.arguments)
    assert args["unit"] in ("c", "f") and 1 <= args["days"] <= 7
    # the tool's result goes back through the chat template, the call under the header the model wrote
    # (functions.get_weather:0); turn 1's state (reply included) is reused
    messages += [msg.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    r2 = c.chat.completions.create(model="demo", messages=messages, tools=TOOLS, max_tokens=4, temperature=0)
    # the reply's own snapshot: every token but the closing one (the next to feed, which the batch has not)
    assert r2.usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens + r.usage.completion_tokens - 1


def test_forced_tool_call_streams_as_deltas(server):
    c = server.client()
    kw = dict(model="demo", messages=user("ping?"), tools=TOOLS, tool_choice="required", max_tokens=64, seed=3)
    whole = c.chat.completions.create(**kw).choices[0]
    assert whole.finish_reason == "tool_calls"
    calls, finish = {}, None
    for ch in c.chat.completions.create(stream=True, **kw):
        finish = ch.choices[0].finish_reason or finish
        for d in ch.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = d.id or entry["id"]
            entry["name"] += d.function.name or ""
            entry["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls"
    want = [{"name": t.function.name, "arguments": t.function.arguments} for t in whole.message.tool_calls]
    streamed = [calls[i] for i in sorted(calls)]
    assert [{k: v for k, v in c.items() if k != "id"} for c in streamed] == want
    assert want[0]["name"] in ("get_weather", "ping")
    ids = [c["id"] for c in streamed] + [t.id for t in whole.message.tool_calls]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"call_[A-Za-z0-9]{24}", i) for i in ids)


def test_tool_choice_none_never_calls(server, demo):
    section = demo[1].special["<|tool_calls_section_begin|>"]
    kw = dict(model="demo", messages=user("x"), tools=TOOLS, max_tokens=3, temperature=0,
              logit_bias={str(section): 100}, logprobs=True)
    marker = list(b"<|tool_calls_section_begin|>")
    r = server.client().chat.completions.create(**kw)  # the bias makes the model open a tool-call section
    assert [e.bytes for e in r.choices[0].logprobs.content] == [marker] * 3
    r = server.client().chat.completions.create(tool_choice="none", **kw)
    assert marker not in [e.bytes for e in r.choices[0].logprobs.content]
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "length"


def test_json_output(server):
    c = server.client()
    # the bias alone would write "}}}}": the grammar makes the first token "{", then "}" ends the object
    r = c.chat.completions.create(model="demo", messages=user("json please"), max_tokens=16, temperature=0,
                                  response_format={"type": "json_object"}, logit_bias={str(ord("}")): 100})
    assert r.choices[0].message.content == "{}" and r.choices[0].finish_reason == "stop"
    r = c.chat.completions.create(model="demo", messages=user("ok?"), max_tokens=32, response_format=BOOL_SCHEMA,
                                  seed=1)
    assert isinstance(json.loads(r.choices[0].message.content)["ok"], bool)


def reference_logprobs(demo, messages):
    model, tok = demo
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    logits = model(mx.array([ids]), model.new_state(1))[0, -1].astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits)), len(ids)


def test_turn_two_reuses_turn_one_and_equals_fresh_prefill(server, demo):
    c = server.client()
    messages = [{"role": "system", "content": "You answer in JSON."}, *user("Is the sky blue? " * 20)]
    r1 = c.chat.completions.create(model="demo", messages=messages, max_tokens=32, response_format=BOOL_SCHEMA,
                                   seed=0, logprobs=True)
    assert r1.choices[0].finish_reason == "stop" and r1.usage.prompt_tokens_details.cached_tokens == 0
    tok = demo[1]
    by_bytes = {tok.decode_bytes([i]): i for i in range(tok.n_ranks)}
    content = r1.choices[0].logprobs.content
    if content and content[-1].token == "<|im_end|>":  # the closing token is not part of the reply's text
        content = content[:-1]
    reply_ids = [by_bytes[bytes(e.bytes)] for e in content]  # BPE: a token's bytes name one id
    assert tok.decode(reply_ids) == r1.choices[0].message.content
    messages += [{"role": "assistant", "content": r1.choices[0].message.content}, *user("Sure?")]
    r2 = c.chat.completions.create(model="demo", messages=messages, max_tokens=1, temperature=0, logprobs=True,
                                   top_logprobs=5)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= r1.usage.prompt_tokens
    assert cached == r1.usage.prompt_tokens + r1.usage.completion_tokens - 1  # the reply's own snapshot (but its last token)
    # the server renders its own reply from the ids it generated, so the fresh prefill does the same
    rendered = [*messages[:2], {"role": "assistant", "content": TokenIds(reply_ids)}, *messages[3:]]
    want, n_prompt = reference_logprobs(demo, rendered)
    assert r2.usage.prompt_tokens == n_prompt
    top = r2.choices[0].logprobs.content[0].top_logprobs
    by_bytes = {bytes(tok.decode_bytes([i])): i for i in range(len(want))}
    got = {by_bytes[bytes(e.bytes)]: e.logprob for e in top}
    assert len(got) == 5 and next(iter(got)) == int(np.argmax(want))
    for token, logprob in got.items():
        assert abs(want[token] - logprob) < 2e-4


def test_sixteen_concurrent_streams_all_complete(server):
    prompts = [f"client {i}: tell me about {'abcdefghijklmnop'[i]}" for i in range(16)]

    async def one(client, prompt):
        stream = await client.chat.completions.create(model="demo", messages=user(prompt), max_tokens=6,
                                                      temperature=0, stream=True)
        text, finish = "", None
        async for ch in stream:
            text += ch.choices[0].delta.content or ""
            finish = ch.choices[0].finish_reason or finish
        return text, finish

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(client, p) for p in prompts)), 120)
        finally:
            await client.close()

    results = asyncio.run(main())
    c = server.client()
    for prompt, (text, finish) in zip(prompts, results):
        want = c.chat.completions.create(model="demo", messages=user(prompt), max_tokens=6, temperature=0).choices[0]
        assert (text, finish) == (want.message.content, want.finish_reason)
    assert server.wait_idle(10) < 10


def test_disconnect_mid_stream_leaves_server_healthy(server):
    body = {"model": "demo", "messages": user("long story"), "max_tokens": 4000, "stream": True,
            "logit_bias": no_stop_bias()}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data:") for line in got)
            assert server.health()["busy"]
    assert server.wait_idle(10) < 10  # 4000 tokens would take far longer: the turn was cancelled
    r = server.client().chat.completions.create(model="demo", messages=user("still there?"), max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_health_answers_during_long_prefill_and_disconnect_cancels_it(server):
    text = "The quick brown fox jumps over the lazy dog. " * 900  # ~40k tokens: many seconds of prefill
    body = {"model": "demo", "messages": user(text), "max_tokens": 2}

    async def main():
        async with httpx.AsyncClient(timeout=httpx.Timeout(60, read=1.5)) as http:
            task = asyncio.ensure_future(http.post(server.url + "/v1/chat/completions", json=body))
            await asyncio.sleep(1.0)
            t0 = time.monotonic()
            health = (await http.get(server.url + "/health", timeout=5)).json()
            latency = time.monotonic() - t0
            with pytest.raises(httpx.ReadTimeout):  # the client gives up and drops the connection
                await task
            return health, latency

    health, latency = asyncio.run(main())
    assert health["busy"] and latency < 1.0
    assert server.wait_idle(8) < 8  # the whole prefill would take far longer: it was cancelled
