"""The FastAPI app: OpenAI-style endpoints over one Engine.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, and the chat page at
/ (web.py) unless settings.web is off. Requests are
validated and templated off the event loop, queued on the engine, and answered whole or as SSE.
A client that goes away (stream closed, or connection dropped while waiting) cancels its turn.
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

from . import errors, web
from .errors import ApiError, BodyLimit
from .openai_format import Output
from .requests import chat_spec, check_model, completion_spec
from .schemas import ChatRequest, CompletionRequest
from .worker import Engine, Failed, Finished, Piece, Progress, QueueFull, TurnSpec

DISCONNECT_POLL_S = 0.25


@dataclass
class ServerSettings:
    model_id: str
    aliases: set[str] = field(default_factory=set)  # other names a request may use for the model
    api_key: str | None = None
    allowed_origins: list[str] = field(default_factory=list)  # CORS is off when empty
    max_body_bytes: int = 64 << 20
    web: bool = True  # the chat page at /

    @property
    def names(self) -> set[str]:
        return {self.model_id, *self.aliases}


class BearerAuth:
    """ASGI middleware: every path but /health and the chat page's files (`public`) needs
    `Authorization: Bearer <api key>` (CORS preflights too are left to the CORS layer, which sits outside
    this one)."""

    def __init__(self, app, api_key: str, public=lambda path: False):
        self.app, self.expected, self.public = app, f"Bearer {api_key}".encode(), public

    async def __call__(self, scope, receive, send):
        if (scope["type"] == "http" and scope["path"] != "/health" and scope["method"] != "OPTIONS"
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
    errors.install(app, errors.schema_fields(ChatRequest, CompletionRequest))
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(BearerAuth, api_key=settings.api_key,
                           **({"public": web.is_public} if settings.web else {}))
    if settings.allowed_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins,
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"])
    created = int(time.time())
    if settings.web:
        web.install(app, settings.model_id, needs_key=bool(settings.api_key))

    @app.get("/health")
    async def health():
        running = engine.running
        return {"status": "ok", "model": settings.model_id, "busy": running is not None,
                "waiting": engine.waiting, "prefix_cache": asdict(engine.cache.stats())}

    def model_card() -> dict:
        return {"id": settings.model_id, "object": "model", "created": created, "owned_by": "kimi-mlx",
                "context_length": engine.model.config.max_position_embeddings}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id not in settings.names:
            raise ApiError(404, f"model {model_id!r} is not served here", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        check_model(req, settings.names)
        spec = await run_in_threadpool(chat_spec, engine, req)
        out = Output(engine.tokenizer, settings.model_id, "chat", parse_tools=bool(req.tools))
        return await respond(request, spec, out, req, req.logprobs)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req, settings.names)
        spec = await run_in_threadpool(completion_spec, engine, req)
        prefix = req.prompt if req.echo and isinstance(req.prompt, str) else ""
        if req.echo and not prefix:
            prefix = engine.tokenizer.decode(spec.prompt)
        out = Output(engine.tokenizer, settings.model_id, "completion", prefix=prefix)
        return await respond(request, spec, out, req, req.logprobs is not None)

    async def respond(request: Request, spec: TurnSpec, out: Output, req, want_logprobs: bool):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:
            job = engine.submit(spec, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        except QueueFull as e:
            raise ApiError(503, f"server busy: {e}; retry later", code="server_busy", headers={"Retry-After": "1"})
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream(engine, job, events, out, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return await collect(request, events, out, want_logprobs)
        finally:
            engine.cancel(job)

    return app


def _failure(ev: Failed) -> ApiError:
    return ApiError(400 if ev.client_error else 500, ev.message, code=None if ev.client_error else "internal_error")


async def collect(request: Request, events: asyncio.Queue, out: Output, want_logprobs: bool) -> Response:
    while True:
        try:
            ev = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                return Response(status_code=499)  # nobody reads it; the caller's finally cancels the turn
            continue
        if isinstance(ev, Piece):
            out.add(ev)
        elif isinstance(ev, Finished):
            return JSONResponse(out.final(ev, want_logprobs))
        elif isinstance(ev, Failed):
            raise _failure(ev)


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def stream(engine: Engine, job, events: asyncio.Queue, out: Output, include_usage: bool):
    """SSE: chunks as tokens come, `: prefill done/total` comments while the prompt is fed, then [DONE]."""
    try:
        if out.kind == "chat":
            yield _data(out.chunk(role=True))
        while True:
            ev = await events.get()
            if isinstance(ev, Progress):
                yield f": prefill {ev.done}/{ev.total}\n\n"
            elif isinstance(ev, Piece):
                deltas, entries = out.add(ev)
                if deltas or entries:
                    yield _data(out.chunk(deltas, entries))
            elif isinstance(ev, Finished):
                yield _data(out.chunk(out.flush(), finish=out.finish_reason(ev)))
                if include_usage:
                    yield _data(out.usage_chunk(ev))
                break
            elif isinstance(ev, Failed):
                yield _data(_failure(ev).body())
                break
        yield "data: [DONE]\n\n"
    finally:
        engine.cancel(job)
