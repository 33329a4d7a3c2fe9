"""`kimi-mlx serve --model demo` as real clients use it: the openai SDK on chat, completions and the Responses
API (blocking, streaming, `parse` with a pydantic model, previous_response_id restoring the stored state),
raw HTTP for each leniency (null fields, top_p 0, unprefixed paths, any Content-Type), model names, logprobs
that spell the text, call ids, parallel and legacy tool calls, prompt scoring against the model's own
log-softmax, and a dropped non-streaming client."""

import asyncio
import json
import re
import subprocess
import sys

import httpx
import mlx.core as mx
import numpy as np
import pytest
from pydantic import BaseModel

from kimi_mlx.server.tools import MAX_PARALLEL_CALLS
from test_server import TOOLS, no_stop_bias, start_server, stop_server, user

openai = pytest.importorskip("openai")
CALL_ID = re.compile(r"call_[A-Za-z0-9]{24}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("server"), "--prefill-step-size", "512")
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def demo():
    from kimi_mlx.loading import load

    return load("demo")


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def in_process(**opts):
    """The app in this process (no socket), for server options the shared server does not use."""
    from fastapi.testclient import TestClient

    from kimi_mlx.server import ServeOptions, build_app

    return TestClient(build_app("demo", ServeOptions(**opts)))


# -- defaults and names ---------------------------------------------------------------------------


def test_no_implicit_cap_and_the_server_default(demo):
    from kimi_mlx.server.requests import options
    from kimi_mlx.server.schemas import ChatRequest
    from kimi_mlx.server.worker import EngineSettings

    class Engine:
        model = demo[0]
        settings = EngineSettings()

    req = ChatRequest(messages=user("x"))
    limit = demo[0].config.max_position_embeddings
    assert options(Engine, req, None, 100).max_tokens == limit - 100  # up to the context limit
    Engine.settings = EngineSettings(max_tokens=3)
    assert options(Engine, req, None, 100).max_tokens == 3
    assert options(Engine, req, 7, 100).max_tokens == 7  # the request's own value wins
    with in_process(max_tokens=3) as c:
        body = {"messages": user("go"), "logit_bias": no_stop_bias(), "max_tokens": None}
        r = c.post("/v1/chat/completions", json=body).json()
        assert r["usage"]["completion_tokens"] == 3 and r["choices"][0]["finish_reason"] == "length"
        r = c.post("/v1/chat/completions", json={**body, "max_tokens": 5}).json()
        assert r["usage"]["completion_tokens"] == 5


def test_any_model_name_is_served_and_reports_its_own_id(server):
    c = server.client()
    r = c.chat.completions.create(model="gpt-4o-mini", messages=user("hi"), max_tokens=2)
    assert r.model == "demo"
    assert c.completions.create(model="text-davinci-003", prompt="x", max_tokens=1).model == "demo"


def test_served_model_names_and_strict_mode():
    with in_process(served_model_names=("kimi-linear", "kimi"), strict_model_name=True) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["kimi-linear", "kimi"]
        assert c.get("/v1/models/kimi").json()["id"] == "kimi"
        for name in ("kimi", "kimi-linear"):
            r = c.post("/v1/chat/completions", json={"model": name, "messages": user("hi"), "max_tokens": 1})
            assert r.status_code == 200 and r.json()["model"] == "kimi-linear"
        for path, body in (("/v1/chat/completions", {"messages": user("hi")}), ("/v1/responses", {"input": "hi"})):
            err = c.post(path, json={"model": "gpt-4o", **body}).json()["error"]
            assert err["code"] == "model_not_found" and "'kimi-linear', 'kimi'" in err["message"]
        assert c.get("/v1/models/gpt-4o").status_code == 404


def test_version(http):
    from kimi_mlx import __version__

    assert http.get("/version").json()["version"] == __version__ == http.get("/health").json()["version"]
    out = subprocess.run([sys.executable, "-m", "kimi_mlx", "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"kimi-mlx {__version__}"


# -- leniency ---------------------------------------------------------------------------------------


def test_null_fields_are_not_given(http):
    nulls = {k: None for k in ("temperature", "top_p", "n", "stream", "stop", "seed", "logprobs", "top_logprobs",
                               "tools", "tool_choice", "response_format", "stream_options", "logit_bias", "user",
                               "presence_penalty", "frequency_penalty", "max_completion_tokens")}
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi", "name": None}],
                                                 "max_tokens": 2, **nulls})
    assert r.status_code == 200, r.text
    r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "echo": None, "logprobs": None,
                                           "suffix": None, "stream": None})
    assert r.status_code == 200, r.text


def test_top_p_zero_is_greedy(http):
    body = {"messages": user("def read(path):"), "max_tokens": 12, "logprobs": True}
    greedy = http.post("/v1/chat/completions", json={**body, "temperature": 0}).json()["choices"][0]
    for seed in (1, 2):
        got = http.post("/v1/chat/completions", json={**body, "top_p": 0, "temperature": 1.5, "seed": seed}).json()
        assert got["choices"][0]["message"]["content"] == greedy["message"]["content"]


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions/", "/chat/completions/"])
def test_paths_without_v1_and_with_a_trailing_slash(http, path):
    r = http.post(path, json={"messages": user("hi"), "max_tokens": 1})
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"


def test_other_paths_and_content_types(http):
    assert [m["id"] for m in http.get("/models").json()["data"]] == ["demo"]
    assert http.get("/health/").json()["status"] == "ok"
    body = json.dumps({"prompt": "x", "max_tokens": 1}).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "application/json; charset=utf-8", None):
        r = http.post("/completions", content=body, headers={"content-type": ctype} if ctype else {})
        assert r.status_code == 200 and r.json()["object"] == "text_completion"


def test_images_are_a_clear_400(http):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, image]}]})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "messages.0.content" and "reads text only" in err["message"]
    r = http.post("/v1/responses", json={"input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "https://x/y.png"}]}]})
    assert r.status_code == 400 and "reads text only" in r.json()["error"]["message"]


# -- logprobs ---------------------------------------------------------------------------------------


def spelled(entries) -> bytes:
    return b"".join(bytes(e.bytes) for e in entries)


def test_logprobs_spell_the_content(server, demo):
    c = server.client()
    stop_tokens = {"<|im_end|>", "[EOS]"}
    # a reply that ends with the end token
    r = c.chat.completions.create(model="demo", messages=user("hi"), max_tokens=200, temperature=0, logprobs=True)
    assert r.choices[0].finish_reason == "stop"
    entries = r.choices[0].logprobs.content
    assert spelled(entries) == r.choices[0].message.content.encode()
    assert not {e.token for e in entries} & stop_tokens
    # a reply cut by a stop string: the string's tokens get no entries
    text = r.choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 3]
    r2 = c.chat.completions.create(model="demo", messages=user("hi"), max_tokens=200, temperature=0, logprobs=True,
                                   stop=[stop])
    content = r2.choices[0].message.content
    assert stop not in content and text.startswith(content)
    cut = r2.choices[0].logprobs.content  # the last entry may be a token that spells both text and stop string
    assert spelled(cut).startswith(content.encode()) and len(spelled(cut[:-1])) < len(content.encode())
    # streamed: no chunk carries logprobs alone, and the chunks' entries are the whole reply's
    chunks = list(c.chat.completions.create(model="demo", messages=user("hi"), max_tokens=200, temperature=0,
                                            logprobs=True, stream=True))
    streamed = []
    for ch in chunks:
        if ch.choices and ch.choices[0].logprobs:
            assert ch.choices[0].delta.content
            streamed += ch.choices[0].logprobs.content
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]
    # a forced call: the forced start has no entries; the generated rest (arguments, closing markers) has
    r3 = c.chat.completions.create(model="demo", messages=user("weather?"), tools=TOOLS, max_tokens=64, logprobs=True,
                                   tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                   parallel_tool_calls=False)
    (call,) = r3.choices[0].message.tool_calls
    closing = "<|tool_call_end|><|tool_calls_section_end|>"
    assert spelled(r3.choices[0].logprobs.content) == (call.function.arguments + closing).encode()


# -- tool calls -------------------------------------------------------------------------------------


def test_parallel_forced_calls_are_numbered_and_resend_exactly(server, demo):
    tok = demo[1]
    c = server.client()
    more = {str(tok.special["<|tool_call_begin|>"]): 30}  # after each call, the model would rather call again
    kw = dict(model="demo", messages=user("ping twice"), tools=TOOLS, tool_choice="required", max_tokens=800,
              temperature=0, logit_bias=more)
    r = c.chat.completions.create(**kw)
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and len(calls) == MAX_PARALLEL_CALLS  # then the section ends
    ids = [t.id for t in calls]
    assert len(set(ids)) == len(ids) and all(CALL_ID.fullmatch(i) for i in ids)
    one = c.chat.completions.create(parallel_tool_calls=False, **kw).choices[0].message.tool_calls
    assert len(one) == 1
    # sent back with the plain ids, the calls render as the model wrote them (functions.NAME:0, :1, ...)
    messages = [*kw["messages"], r.choices[0].message.model_dump(exclude_none=True),
                *({"role": "tool", "tool_call_id": t.id, "content": "ok"} for t in calls)]
    r2 = c.chat.completions.create(model="demo", messages=messages, tools=TOOLS, max_tokens=1)
    # the reply's own snapshot: every token but the closing one (the next to feed, which the batch has not)
    assert r2.usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens + r.usage.completion_tokens - 1


def test_parallel_tool_calls_false_allows_one_call_in_auto_mode(server, demo):
    begin = demo[1].special["<|tool_call_begin|>"]
    kw = dict(model="demo", messages=user("ping"), tools=TOOLS, max_tokens=6, temperature=0, logprobs=True,
              logit_bias={str(begin): 30})  # the model would open call after call
    marker = list(b"<|tool_call_begin|>")
    many = server.client().chat.completions.create(**kw).choices[0].logprobs.content
    one = server.client().chat.completions.create(parallel_tool_calls=False, **kw).choices[0].logprobs.content
    assert [e.bytes for e in many].count(marker) == 6 and [e.bytes for e in one].count(marker) == 1


def test_legacy_functions(server):
    functions = [t["function"] for t in TOOLS]
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "messages": user("weather?"), "functions": functions, "function_call": {"name": "get_weather"},
        "max_tokens": 64, "temperature": 0}).json()
    choice = r["choices"][0]
    assert choice["finish_reason"] == "function_call" and "tool_calls" not in choice["message"]
    call = choice["message"]["function_call"]
    assert call["name"] == "get_weather" and json.loads(call["arguments"])["unit"] in ("c", "f")
    # the call and its result sent back the legacy way
    messages = [*user("weather?"), {"role": "assistant", "content": None, "function_call": call},
                {"role": "function", "name": "get_weather", "content": "21 C"}]
    r2 = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "messages": messages, "functions": functions, "max_tokens": 1}).json()
    assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] == \
        r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"] - 1  # the reply's state, but its last token


class Inner(BaseModel):
    n: int


class Pydantic(BaseModel):
    tags: set[str]
    inner: Inner
    maybe: int | None = None


def test_pydantic_schemas_are_served_relaxed_with_a_warning(server, http):
    c = server.client()
    r = c.chat.completions.with_raw_response.parse(model="demo", messages=user("json"), response_format=Pydantic,
                                                   max_tokens=200, seed=0)
    assert "uniqueItems" in r.headers["x-kimi-mlx-warning"]
    parsed = r.parse().choices[0].message.parsed
    assert isinstance(parsed, Pydantic) and isinstance(parsed.inner.n, int)
    # a keyword that changes which values are allowed is still refused
    body = {"messages": user("x"), "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "not": {"required": ["a"]}}}}}
    assert http.post("/v1/chat/completions", json=body).status_code == 400


# -- a dropped non-streaming request ------------------------------------------------------------------


def test_dropped_non_streaming_request_stops_decoding(server):
    body = {"messages": user("a long story"), "max_tokens": 200_000, "logit_bias": no_stop_bias()}

    async def main():
        async with httpx.AsyncClient(timeout=httpx.Timeout(60, read=2.0)) as client:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up mid-decode and drops the connection
                await client.post(server.url + "/v1/chat/completions", json=body)

    asyncio.run(main())
    assert server.wait_idle(8) < 8  # 200,000 tokens would take far longer: the turn was cancelled


# -- completions: SDK and scoring ---------------------------------------------------------------------


def test_prompt_scoring_equals_the_models_log_softmax(server, demo):
    model, tok = demo
    prompt = "def read_lines(path):\n    with open(path) as f:\n        return f.readlines()\n"
    ids = tok.encode(prompt)
    c = server.client()
    r = c.completions.create(model="demo", prompt=prompt, echo=True, logprobs=2, max_tokens=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == prompt and r.usage.completion_tokens == 0
    assert len(lp.token_logprobs) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    logits = model(mx.array([ids]))[0].astype(mx.float32)
    want = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    expected = [want[i - 1, ids[i]] for i in range(1, len(ids))]
    np.testing.assert_allclose(lp.token_logprobs[1:], expected, atol=2e-4)
    assert "".join(lp.tokens) == prompt and lp.text_offset[1] == len(lp.tokens[0])
    for i in range(1, len(ids)):
        best = max(lp.top_logprobs[i].values())
        assert abs(best - want[i - 1].max()) < 2e-4
    # lm-evaluation-harness's request: token ids, echo, one generated token it then drops
    r = c.completions.create(model="demo", prompt=[ids], echo=True, logprobs=1, max_tokens=1, temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1
    np.testing.assert_allclose(lp.token_logprobs[1:len(ids)], expected, atol=2e-4)
    assert abs(lp.token_logprobs[-1] - want[-1].max()) < 2e-4  # greedy: the best next token


def test_completions_sdk_streaming_with_echo(server):
    c = server.client()
    whole = c.completions.create(model="demo", prompt="import os", max_tokens=5, temperature=0, echo=True)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="demo", prompt="import os", max_tokens=5, temperature=0, echo=True, stream=True) if ch.choices)
    assert streamed == whole.choices[0].text and whole.choices[0].text.startswith("import os")
    # scoring streamed: the prompt and its scores come first, in one chunk
    scored = c.completions.create(model="demo", prompt="import os", max_tokens=0, echo=True, logprobs=1)
    first = next(iter(c.completions.create(model="demo", prompt="import os", max_tokens=0, echo=True, logprobs=1,
                                           stream=True))).choices[0]
    assert first.text == "import os" and first.logprobs.token_logprobs == scored.choices[0].logprobs.token_logprobs


# -- the Responses API ----------------------------------------------------------------------------------


def test_responses_blocking_and_streaming_agree(server):
    c = server.client()
    kw = dict(model="demo", input="def parse(text):", instructions="You write Python.", max_output_tokens=8,
              temperature=0)
    r = c.responses.create(**kw)
    assert r.object == "response" and r.model == "demo" and r.status in ("completed", "incomplete")
    assert r.output_text and r.usage.output_tokens >= 1 and r.usage.input_tokens > 5
    kinds, text, done = [], "", None
    for ev in c.responses.create(stream=True, **kw):
        kinds.append(ev.type)
        if ev.type == "response.output_text.delta":
            text += ev.delta
        if ev.type in ("response.completed", "response.incomplete"):
            done = ev.response
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert text == r.output_text == done.output_text and done.status == r.status
    assert c.responses.retrieve(done.id).output_text == text


def test_responses_previous_response_id_restores_the_state(server):
    c = server.client()
    first = c.responses.create(model="demo", input="def add(a, b):", instructions="Python only.",
                               max_output_tokens=12, temperature=0)
    follow = c.responses.create(model="demo", input="Now subtract.", instructions="Python only.",
                                previous_response_id=first.id, max_output_tokens=12, temperature=0)
    consumed = first.usage.input_tokens + first.usage.output_tokens - 1  # the reply's state holds all but its last
    assert follow.usage.input_tokens_details.cached_tokens == consumed  # only the new input was prefilled
    assert follow.previous_response_id == first.id
    # the same conversation sent whole, statelessly, gives the same greedy reply
    again = c.responses.create(model="demo", instructions="Python only.", store=False, max_output_tokens=12,
                               temperature=0, input=[
                                   {"role": "user", "content": "def add(a, b):"},
                                   {"role": "assistant", "content": first.output_text},
                                   {"role": "user", "content": "Now subtract."}])
    assert again.output_text == follow.output_text
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(again.id)  # store: false
    c.responses.delete(follow.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(follow.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="demo", input="x", previous_response_id="resp_unknown")


def test_responses_parse_with_a_pydantic_model(server):
    class Answer(BaseModel):
        ok: bool
        count: int

    r = server.client().responses.parse(model="demo", input="answer in JSON", text_format=Answer,
                                        max_output_tokens=100, temperature=0)
    assert isinstance(r.output_parsed, Answer)


def test_responses_function_calls_and_their_outputs(server):
    c = server.client()
    tools = [{"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"]}
             for t in TOOLS]
    r = c.responses.create(model="demo", input="weather in Paris?", tools=tools, max_output_tokens=64,
                           tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False)
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and CALL_ID.fullmatch(call.call_id)
    assert json.loads(call.arguments)["unit"] in ("c", "f")
    follow = c.responses.create(model="demo", previous_response_id=r.id, tools=tools, max_output_tokens=2,
                                input=[{"type": "function_call_output", "call_id": call.call_id, "output": "21 C"}])
    assert follow.usage.input_tokens_details.cached_tokens == r.usage.input_tokens + r.usage.output_tokens - 1
    # streamed: the arguments come as deltas
    deltas, done = "", None
    for ev in c.responses.create(model="demo", input="weather?", tools=tools, max_output_tokens=64, stream=True,
                                 tool_choice="required", parallel_tool_calls=False):
        if ev.type == "response.function_call_arguments.delta":
            deltas += ev.delta
        if ev.type == "response.function_call_arguments.done":
            done = ev.arguments
    assert deltas == done and json.loads(done)


def test_stored_responses_expire_least_recently_used_first():
    with in_process(prefix_cache_bytes=3 << 20, snapshot_interval=100000) as c:
        first = c.post("/v1/responses", json={"input": "first", "max_output_tokens": 2}).json()["id"]
        assert c.get(f"/v1/responses/{first}").status_code == 200
        for i in range(12):
            c.post("/v1/responses", json={"input": f"other {i} " * 8, "max_output_tokens": 2})
        r = c.get(f"/v1/responses/{first}")
        assert r.status_code == 404 and "expired" in r.json()["error"]["message"]
        r = c.post("/v1/responses", json={"input": "x", "previous_response_id": first})
        assert r.status_code == 404 and r.json()["error"]["param"] == "previous_response_id"
        assert 0 < c.get("/health").json()["stored_responses"] < 13


def test_responses_logprobs_spell_the_text(server):
    c = server.client()
    kw = dict(model="demo", input="def f():", max_output_tokens=200, temperature=0, top_logprobs=2,
              include=["message.output_text.logprobs"])
    r = c.responses.create(**kw)
    (part,) = r.output[0].content
    assert b"".join(bytes(e.bytes) for e in part.logprobs) == r.output_text.encode()
    assert all(len(e.top_logprobs) == 2 for e in part.logprobs)
    streamed = [e for ev in c.responses.create(stream=True, **kw) if ev.type == "response.output_text.delta"
                for e in ev.logprobs]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in part.logprobs]
