"""OpenAI-style error objects, and the handlers that turn every client mistake into one (never a 500)."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("kimi_mlx.server")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         413: "invalid_request_error", 429: "rate_limit_error", 503: "server_overloaded"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def field_name(loc, known: set[str]) -> str:
    """The request field an error is about: ('body', 'messages', 0, 'content', 'str') -> messages.0.content.

    Pydantic adds union branch names ('str', 'list[TextPart]') and dict keys to the location; the path
    stops at the first part that is neither an index nor a field name of the request schemas.
    """
    parts = []
    for p in loc[1:] if loc and loc[0] == "body" else loc:
        if not (isinstance(p, int) or p in known):
            break
        parts.append(str(p))
    return ".".join(parts)


def validation_error(exc: RequestValidationError, known: set[str]) -> ApiError:
    problems = exc.errors() or [{"loc": (), "msg": "invalid request", "type": ""}]
    first = problems[0]
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})",
                        code="invalid_json")
    params = list(dict.fromkeys(field_name(p.get("loc", ()), known) for p in problems))
    if params[0] == "" and first.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        return ApiError(400, "the request body must be a JSON object sent with Content-Type: application/json",
                        code="invalid_body")
    param = params[0] or None
    more = len(params) - 1
    msg = f"{param or 'body'}: {first.get('msg')}" + (f" (and {more} more field{'s' * (more > 1)})" if more else "")
    return ApiError(400, msg, param=param, code="invalid_value")


def schema_fields(*models) -> set[str]:
    """Every field name and alias in these pydantic models and the models nested in them."""
    from pydantic import BaseModel

    names: set[str] = set()
    seen: set = set()

    def walk(model):
        if model in seen:
            return
        seen.add(model)
        for name, f in model.model_fields.items():
            names.update({name, f.alias} - {None})
            for t in _types(f.annotation):
                if isinstance(t, type) and issubclass(t, BaseModel):
                    walk(t)

    for m in models:
        walk(m)
    return names


def _types(annotation):
    from typing import get_args

    yield annotation
    for a in get_args(annotation):
        yield from _types(a)


def install(app: FastAPI, known_fields: set[str]) -> None:
    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return validation_error(exc, known_fields).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        msg = {404: f"no route {request.method} {request.url.path}", 405: f"method {request.method} not allowed here"}
        return ApiError(exc.status_code, msg.get(exc.status_code, str(exc.detail)), headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return JSONResponse({"error": {"message": f"internal error: {type(exc).__name__}", "type": "server_error",
                                       "param": None, "code": None}}, status_code=500)


class BodyLimit:
    """ASGI middleware: reads the request body first; one over max_bytes (declared or sent) gets a 413."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = ApiError(413, f"request body larger than {self.max_bytes} bytes (the server's --max-body-bytes)",
                           code="body_too_large")
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_json(send, too_big)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await _send_json(send, too_big)
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def buffered_receive():
            return replay.pop() if replay else await receive()

        await self.app(scope, buffered_receive, send)


async def _send_json(send, err: ApiError) -> None:
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
