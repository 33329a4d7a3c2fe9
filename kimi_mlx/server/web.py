"""The chat page at `/` (off with `kimi-mlx serve --no-web`): one HTML file, one script and one stylesheet
shipped in the package (static/), no CDN. The page talks to /v1/chat/completions like any other client.

The page and its files are public (they hold no data); /web/server.json tells the page the model's name and
whether the API needs a key, so the page asks for one before its first request instead of after a 401.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse

STATIC = Path(__file__).with_name("static")
FILES = {"chat.js": "text/javascript", "chat.css": "text/css"}
PREFIX = "/web/"
# Defence in depth: the page builds model output with DOM text nodes (never as HTML); this header also keeps
# any injected markup from running script, loading anything from elsewhere or being framed.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def is_public(path: str) -> bool:
    """Paths served without the API key."""
    return path == "/" or path.startswith(PREFIX)


def install(app: FastAPI, model_id: str, needs_key: bool) -> None:
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)

    @app.get(PREFIX + "server.json", include_in_schema=False)
    async def server_info():
        return {"model": model_id, "api_key_required": needs_key}

    for name, media_type in FILES.items():
        app.add_api_route(PREFIX + name, _file_route(name, media_type), methods=["GET"], include_in_schema=False)


def _file_route(name: str, media_type: str):
    async def send_file():
        return FileResponse(STATIC / name, media_type=media_type, headers=HEADERS)

    return send_file
