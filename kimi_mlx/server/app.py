"""The FastAPI app: OpenAI-style endpoints over one Engine.

Endpoints: POST /v1/chat/completions, POST /v1/completions, POST /v1/responses, GET and DELETE
/v1/responses/{id}, GET /v1/models, GET /health, GET /version, GET /stats (speculative decoding), and the
chat page at / (web.py)
unless settings.web is off. Paths also answer without the /v1 prefix
and with a trailing slash, and a POST body is read as JSON whatever its Content-Type says (curl -d sends
form encoding). Requests are validated and templated off the event loop, queued on the engine, and
answered whole or as SSE. A client that goes away (stream closed, or connection dropped, streaming or not)
cancels its turn.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .. import __version__
from ..errors import KimiError
from ..generate import stop_ids
from . import errors, web
from .errors import ApiError, BodyLimit
from .openai_format import Output, combined, usage as usage_of
from .requests import chat_spec, check_model, completion_spec, turn_spec
from .responses import ResponseOutput, ResponseStore, not_found, request_echo, responses_turn, wants_logprobs
from .schemas import ChatRequest, CompletionRequest, ResponsesRequest
from .worker import Engine, Failed, Finished, Piece, Progress, QueueFull, Scored, TurnSpec

DISCONNECT_POLL_S = 0.25
WARNING_HEADER = "X-Kimi-MLX-Warning"  # what of the request was served relaxed (e.g. schema keywords not enforced)
UNVERSIONED = ("/health", "/version", "/stats")  # paths outside /v1


@dataclass
class ServerSettings:
    model_id: str  # the id replies report and /v1/models lists first
    aliases: list[str] = field(default_factory=list)  # more ids /v1/models lists for the model
    api_key: str | None = None
    allowed_origins: list[str] = field(default_factory=list)  # CORS is off when empty
    max_body_bytes: int = 64 << 20
    strict_model_name: bool = False  # True: a request naming a model not listed (or in `accepted`) is a 404
    accepted: set[str] = field(default_factory=set)  # names taken without being listed (the --model path)
    web: bool = True  # the chat page at /

    @property
    def names(self) -> list[str]:
        return list(dict.fromkeys([self.model_id, *self.aliases]))


class Lenient:
    """ASGI middleware, outermost: /chat/completions is /v1/chat/completions, a trailing slash is dropped,
    and a POST body is parsed as JSON whatever Content-Type it was sent with (the body decides: one that is
    not JSON is a 400 saying so)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            path = scope["path"]
            path = path.rstrip("/") or "/"
            if (path != "/" and path != "/v1" and not path.startswith(("/v1/", web.PREFIX))
                    and path not in UNVERSIONED):
                path = "/v1" + path
            if path != scope["path"]:
                scope = {**scope, "path": path, "raw_path": path.encode()}
            if scope["method"] == "POST":
                headers = [(k, v) for k, v in scope.get("headers", []) if k != b"content-type"]
                given = dict(scope.get("headers", [])).get(b"content-type", b"").split(b";")[0].strip().lower()
                if given != b"application/json" and not given.endswith(b"+json"):
                    given = b"application/json"
                scope = {**scope, "headers": [*headers, (b"content-type", given)]}
        await self.app(scope, receive, send)


class BearerAuth:
    """ASGI middleware: every path but /health, /version and the chat page's files (`public`) needs
    `Authorization: Bearer <api key>` (CORS preflights too are left to the CORS layer, which sits outside
    this one)."""

    def __init__(self, app, api_key: str, public=lambda path: False):
        self.app, self.expected, self.public = app, f"Bearer {api_key}".encode(), public

    async def __call__(self, scope, receive, send):
        if (scope["type"] == "http" and scope["path"] not in UNVERSIONED and scope["method"] != "OPTIONS"
                and not self.public(scope["path"])):
            given = dict(scope.get("headers", [])).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                err = ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' "
                                    "with the key the server was started with", code="invalid_api_key")
                return await err.response()(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(engine: Engine, settings: ServerSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="kimi-mlx", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    errors.install(app, errors.schema_fields(ChatRequest, CompletionRequest, ResponsesRequest))
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(BearerAuth, api_key=settings.api_key,
                           **({"public": web.is_public} if settings.web else {}))
    if settings.allowed_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins,
                           allow_methods=["GET", "POST", "DELETE", "OPTIONS"], allow_headers=["*"])
    app.add_middleware(Lenient)
    created = int(time.time())
    store = ResponseStore(engine.cache)
    stops = stop_ids(engine.model, engine.tokenizer)
    names = settings.names
    if settings.web:
        web.install(app, settings.model_id, needs_key=bool(settings.api_key))

    @app.get("/health")
    async def health():
        # running: rows decoding in the batch (a request with n choices has n); prefilling: requests whose
        # prompt is being fed; queued: requests waiting to start (for rows, memory or their turn); paused: rows
        # of requests preempted for memory (they resume when it frees); preemptions: requests paused so far
        return {"status": "ok", "model": settings.model_id, "version": __version__, "busy": engine.busy,
                "running": engine.rows_running, "prefilling": engine.prefilling, "queued": engine.waiting,
                "paused": engine.rows_paused, "preemptions": engine.preemptions,
                "waiting": engine.waiting, "max_batch": engine.settings.max_batch,
                "prefix_cache": asdict(engine.cache.stats()), "stored_responses": len(store)}

    @app.get("/stats")
    async def stats():
        """Speculative decoding's counts over the replies served with a draft (serve --draft, or requests with
        "speculative": true)."""
        s = engine.spec
        return {"draft": engine.settings.draft, "speculative_replies": engine.spec_replies, "drafted": s.drafted,
                "accepted": s.accepted, "acceptance_rate": s.accepted / s.drafted if s.drafted else None,
                "forwards": s.forwards, "tokens": s.tokens, "tokens_per_forward": s.tokens_per_forward}

    @app.get("/version")
    async def version():
        return {"version": __version__, "model": settings.model_id}

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "kimi-mlx",
                "context_length": engine.model.config.max_position_embeddings}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(n) for n in names]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id not in names and model_id not in settings.accepted:
            listed = ", ".join(repr(n) for n in names)
            raise ApiError(404, f"model {model_id!r} is not served here; GET /v1/models lists {listed}",
                           param="model", code="model_not_found")
        return model_card(model_id if model_id in names else settings.model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        check_model(req, names, settings.strict_model_name, settings.accepted)
        spec = await run_in_threadpool(chat_spec, engine, req)
        legacy = not req.tools and bool(req.functions)
        out = Output(engine.tokenizer, settings.model_id, "chat", parse_tools=bool(req.tools or req.functions),
                     legacy_functions=legacy)
        return await respond(request, spec, out, req, req.logprobs)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req, names, settings.strict_model_name, settings.accepted)
        spec = await run_in_threadpool(completion_spec, engine, req)
        prefix = req.prompt if req.echo and isinstance(req.prompt, str) else ""
        if req.echo and not prefix:
            prefix = engine.tokenizer.decode(spec.prompt)
        out = Output(engine.tokenizer, settings.model_id, "completion", prefix=prefix)
        return await respond(request, spec, out, req, req.logprobs is not None)

    @app.post("/v1/responses")
    async def responses(req: ResponsesRequest, request: Request):
        check_model(req, names, settings.strict_model_name, settings.accepted)
        if req.n != 1:
            raise ApiError(400, "n: the Responses API makes one output a request; send n requests for n samples "
                                "(or use /v1/chat/completions with n)", param="n", code="unsupported_value")

        def build():
            turn, history, calls = responses_turn(req, store)
            return turn_spec(engine, turn), history, calls, bool(turn.tools)

        spec, history, calls, parse_tools = await run_in_threadpool(build)
        out = ResponseOutput(settings.model_id, request_echo(req), parse_tools,
                             Output(engine.tokenizer, settings.model_id, "chat") if wants_logprobs(req) else None)

        def finished(done: Finished) -> dict:
            body, events = out.finish(done)
            remember_calls(out.parser, done)
            if req.store and done.state_tokens is not None:
                kept = out.stored(history, calls, done, stops)
                kept.body = body
                store.put(out.id, kept)
            return body, events

        job, events = submit(spec)
        headers = warning_headers(spec)
        if req.stream:
            return StreamingResponse(stream_responses(engine, job, events, out, finished),
                                     media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
        checked = [time.monotonic()]
        try:
            while True:
                ev = await next_event(request, events, checked)
                if ev is None:
                    return Response(status_code=499)
                if isinstance(ev, Piece):
                    out.add(ev)
                elif isinstance(ev, Finished):
                    return JSONResponse(finished(ev)[0], headers=headers)
                elif isinstance(ev, Failed):
                    raise _failure(ev)
        finally:
            engine.cancel(job)

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str):
        kept = store.get(response_id)
        if kept is None:
            raise not_found(response_id, store)
        return kept.body

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str):
        if not store.delete(response_id):
            raise not_found(response_id, store)
        return {"id": response_id, "object": "response", "deleted": True}

    def remember_calls(parser, done: Finished) -> None:
        """A reply's tool calls, for rendering them as generated when the client sends them back."""
        if parser.calls:
            for call in parser.calls:
                engine.call_ids.remember(call.id, call.header)
            engine.replies.remember_calls(parser.calls, parser.content, done.generated, stops)

    def submit(spec: TurnSpec):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:
            job = engine.submit(spec, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        except QueueFull as e:
            raise ApiError(503, f"server busy: {e}; retry later", code="server_busy", headers={"Retry-After": "1"})
        except KimiError as e:
            raise ApiError(400, str(e), param="n", code="invalid_value") from None
        return job, events

    async def respond(request: Request, spec: TurnSpec, out: Output, req, want_logprobs: bool):
        job, events = submit(spec)
        headers = warning_headers(spec)
        outs = [out] + [out.choice(j) for j in range(1, spec.n)]

        def finished(done: Finished) -> None:
            remember_calls(outs[done.index].parser, done)

        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream(engine, job, events, outs, usage, finished, spec.score),
                                     media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
        checked = [time.monotonic()]
        dones: dict[int, Finished] = {}
        try:
            while True:
                ev = await next_event(request, events, checked)
                if ev is None:
                    return Response(status_code=499)  # nobody reads it; the finally cancels the turn
                if isinstance(ev, Scored):
                    for o in outs:
                        o.scored(ev)
                elif isinstance(ev, Piece):
                    outs[ev.index].add(ev)
                elif isinstance(ev, Finished):
                    finished(ev)
                    dones[ev.index] = ev
                    if len(dones) == len(outs):
                        bodies = [o.final(dones[j], want_logprobs) for j, o in enumerate(outs)]
                        body = {**bodies[0], "choices": [b["choices"][0] for b in bodies],
                                "usage": usage_of(combined([dones[j] for j in range(len(outs))]))}
                        return JSONResponse(body, headers=headers)
                elif isinstance(ev, Failed):
                    raise _failure(ev)
        finally:
            engine.cancel(job)

    return app


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def warning_headers(spec: TurnSpec) -> dict:
    return {WARNING_HEADER: "; ".join(dict.fromkeys(spec.warnings))} if spec.warnings else {}


def _failure(ev: Failed) -> ApiError:
    return ApiError(400 if ev.client_error else 500, ev.message, code=None if ev.client_error else "internal_error")


async def next_event(request: Request, events: asyncio.Queue, checked: list[float]):
    """The next engine event, or None once the client has gone. The connection is checked at least every
    DISCONNECT_POLL_S: while the engine is silent (a long prefill step) and while tokens keep coming
    (`checked` holds the time of the last check, so a steady stream of events cannot starve it)."""
    while True:
        now = time.monotonic()
        if now - checked[0] >= DISCONNECT_POLL_S:
            checked[0] = now
            if await request.is_disconnected():
                return None
        try:
            return await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            continue


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def stream(engine: Engine, job, events: asyncio.Queue, outs: list[Output], include_usage: bool, finished,
                 scoring: bool = False):
    """SSE: chunks as tokens come (each choice's with its index), `: prefill done/total` comments while the
    prompt is fed, the usage chunk (if asked) once every choice has finished, then [DONE]."""
    try:
        for out in outs:
            if out.kind == "chat":
                yield _data(out.chunk(role=True))
            elif out.prefix and not scoring:  # completions with echo: the prompt first (with its scores, if asked)
                yield _data({**out.chunk(), "choices": [{"index": out.index, "text": out.prefix,
                                                         "finish_reason": None, "logprobs": None}]})
        dones: dict[int, Finished] = {}
        while True:
            ev = await events.get()
            if isinstance(ev, Progress):
                yield f": prefill {ev.done}/{ev.total}\n\n"
            elif isinstance(ev, Scored):
                for out in outs:
                    out.scored(ev)
                    chunk = out.chunk()
                    chunk["choices"][0].update(text=out.prefix, logprobs=out.completion_logprobs(out.logprobs))
                    yield _data(chunk)
            elif isinstance(ev, Piece):
                out = outs[ev.index]
                deltas, entries = out.add(ev)
                if deltas or entries:
                    yield _data(out.chunk(deltas, entries))
            elif isinstance(ev, Finished):
                out = outs[ev.index]
                finished(ev)
                dones[ev.index] = ev
                deltas, entries = out.flush()
                yield _data(out.chunk(deltas, entries, finish=out.finish_reason(ev)))
                if len(dones) == len(outs):
                    if include_usage:
                        yield _data(outs[0].usage_chunk(combined([dones[j] for j in range(len(outs))])))
                    break
            elif isinstance(ev, Failed):
                yield _data(_failure(ev).body())
                break
        yield "data: [DONE]\n\n"
    finally:
        engine.cancel(job)


def _event(obj: dict) -> str:
    return f"event: {obj['type']}\ndata: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def stream_responses(engine: Engine, job, events: asyncio.Queue, out: ResponseOutput, finished):
    """SSE of the Responses API: typed events (response.created ... response.completed), no [DONE]."""
    try:
        for e in out.start():
            yield _event(e)
        while True:
            ev = await events.get()
            if isinstance(ev, Progress):
                yield f": prefill {ev.done}/{ev.total}\n\n"
            elif isinstance(ev, Piece):
                for e in out.add(ev):
                    yield _event(e)
            elif isinstance(ev, Finished):
                for e in finished(ev)[1]:
                    yield _event(e)
                break
            elif isinstance(ev, Failed):
                err = _failure(ev)
                yield _event(out.event("error", code=err.code, message=err.message, param=err.param))
                body = {**out.response("failed"), "error": {"code": err.code or "server_error",
                                                             "message": err.message}}
                yield _event(out.event("response.failed", response=body))
                break
    finally:
        engine.cancel(job)
