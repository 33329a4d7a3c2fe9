"""Raw HTTP against `kimi-mlx serve` (demo, --api-key, small body limit, --max-queue 1, --max-batch 1): every
client mistake is a 4xx OpenAI error object naming the field, auth is enforced, CORS is off, a full queue answers
503."""

import threading
import time

import httpx
import pytest

from test_server import no_stop_bias, start_server, stop_server, user

openai = pytest.importorskip("openai")
KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("server"), "--api-key", KEY, "--max-body-bytes", "64KiB",
                     "--max-queue", "1", "--max-batch", "1", "--prefill-step-size", "256")
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
        yield client


def error_of(resp, status):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def chat(http, **body):
    return http.post("/v1/chat/completions", json={"messages": user("hi"), "max_tokens": 2, **body})


def test_malformed_json_and_non_object_bodies(http):
    for raw in (b"{bad", b'{"messages": [', b"\xff\xfe"):
        err = error_of(http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"}),
                       400)
        assert err["code"] == "invalid_json"
    for raw in (b"[1, 2]", b'"text"', b"null"):
        err = error_of(http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"}),
                       400)
        assert "must be a JSON object" in err["message"]
    # the body decides, not its Content-Type (curl -d sends form encoding)
    for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
        err = error_of(http.post("/v1/chat/completions", content=b"messages=hi",
                                 headers={"content-type": ctype} if ctype else {}), 400)
        assert err["code"] == "invalid_json"


@pytest.mark.parametrize("body, param", [
    ({"messages": None}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"content": "x"}]}, "messages.0.role"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 7}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_p": -0.5}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"stop": 5}, "stop"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"n": 2}, "n"),  # over --max-batch 1
    ({"n": 0}, "n"),
    ({"n": -1}, "n"),
    ({"n": "2"}, "n"),
    ({"n": 1.5}, "n"),
    ({"n": True}, "n"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}},
      "tools": [{"type": "function", "function": {"name": "real"}}]}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
     "response_format"),
    ({"stream_options": {"include_usage": "sometimes"}}, "stream_options.include_usage"),
])
def test_wrong_fields_are_400_naming_the_field(http, body, param):
    err = error_of(chat(http, **body), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_context_too_long(http):
    err = error_of(chat(http, max_tokens=5_000_000), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
    err = error_of(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 5_000_000}), 400)
    assert err["code"] == "context_length_exceeded"


def test_completions_field_errors(http):
    assert error_of(http.post("/v1/completions", json={"prompt": ["a", "b"]}), 400)["param"] == "prompt"
    assert error_of(http.post("/v1/completions", json={"prompt": ""}), 400)["param"] == "prompt"
    assert error_of(http.post("/v1/completions", json={"prompt": [1, 10**9]}), 400)["param"] == "prompt"
    err = error_of(http.post("/v1/completions", json={"prompt": "x", "suffix": "y"}), 400)
    assert err["param"] == "suffix" and "fill-in-the-middle" in err["message"]
    assert error_of(http.post("/v1/completions", json={}), 400)["param"] == "prompt"
    r = http.post("/v1/completions", json={"prompt": [72, 105], "max_tokens": 2, "echo": True})
    assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("Hi")


def test_oversized_body_is_413(http):
    big = {"messages": user("a" * 70_000)}
    err = error_of(http.post("/v1/chat/completions", json=big), 413)
    assert err["code"] == "body_too_large"

    def chunks():  # no Content-Length: the limit holds on the bytes actually sent
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"a" * 5000
        yield b'"}]}'

    error_of(http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}), 413)


def test_unknown_route_and_method_are_json_errors(http):
    error_of(http.get("/v1/nothing"), 404)
    error_of(http.get("/v1/chat/completions"), 405)
    error_of(http.get("/v1/models/other"), 404)
    assert http.get("/v1/models/demo").json()["id"] == "demo"


def test_api_key_is_required_except_on_health(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        err = error_of(httpx.post(server.url + "/v1/chat/completions", json={"messages": user("hi")},
                                  headers=headers, timeout=10), 401)
        assert err["code"] == "invalid_api_key"
    error_of(httpx.get(server.url + "/v1/models", timeout=10), 401)
    error_of(httpx.get(server.url + "/anything", timeout=10), 401)
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    r = server.client(api_key=KEY).chat.completions.create(model="demo", messages=user("hi"), max_tokens=2)
    assert r.usage.completion_tokens >= 1


def test_cors_is_off_by_default(http):
    r = http.options("/v1/chat/completions", headers={"Origin": "http://evil.example",
                                                       "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    r = chat(http, stream=False)
    assert "access-control-allow-origin" not in r.headers


def test_cors_when_configured():
    from fastapi.testclient import TestClient

    from kimi_mlx.server import ServeOptions, build_app

    app = build_app("demo", ServeOptions(allowed_origins=("http://ui.local",)))
    with TestClient(app) as client:  # in process, no socket
        pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
        ok = client.options("/v1/chat/completions", headers={"Origin": "http://ui.local", **pre})
        assert ok.headers["access-control-allow-origin"] == "http://ui.local"
        other = client.options("/v1/chat/completions", headers={"Origin": "http://evil.example", **pre})
        assert "access-control-allow-origin" not in other.headers


def test_full_queue_answers_503_and_recovers(server, http):
    """--max-queue 1: one turn runs, one waits, the next is refused; dropping both frees the engine."""
    long = {"messages": user("go on"), "max_tokens": 4000, "stream": True, "logit_bias": no_stop_bias()}
    stop = threading.Event()
    started = []

    def hold(name):
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:
            with c.stream("POST", "/v1/chat/completions", json=long) as resp:
                started.append((name, resp.status_code))
                for _ in resp.iter_lines():
                    if stop.is_set():
                        return

    threads = [threading.Thread(target=hold, args=(n,), daemon=True) for n in ("a", "b")]
    try:
        threads[0].start()
        deadline = time.monotonic() + 10
        while not server.health()["busy"] and time.monotonic() < deadline:
            time.sleep(0.02)
        threads[1].start()
        while server.health()["waiting"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.health()["waiting"] == 1
        r = chat(http)
        err = error_of(r, 503)
        assert err["code"] == "server_busy" and r.headers["retry-after"] == "1"
    finally:
        stop.set()
        for t in threads:
            t.join(20)
    assert sorted(started) == [("a", 200), ("b", 200)]
    assert server.wait_idle(10) < 10
    assert chat(http).status_code == 200
