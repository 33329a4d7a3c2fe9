"""The chat page's routes without a browser: served at / with its two files, public under --api-key while the
API stays closed, gone under --no-web; the files load nothing from elsewhere and never parse text as HTML.
(The page itself runs in tests/test_web_browser.py.)"""

import re

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from kimi_mlx.server.app import ServerSettings, create_app
from kimi_mlx.server.web import STATIC
from kimi_mlx.server.worker import Engine, EngineSettings


@pytest.fixture(scope="module")
def engine():
    from kimi_mlx.loading import load

    return Engine(*load("demo"), EngineSettings())


def client(engine, **settings) -> TestClient:
    return TestClient(create_app(engine, ServerSettings("demo", **settings)))  # no lifespan: the engine stays idle


def test_page_and_its_files_are_served_with_a_strict_policy(engine):
    c = client(engine)
    page = c.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for path, kind in (("/web/chat.js", "text/javascript"), ("/web/chat.css", "text/css")):
        r = c.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
        assert r.text == (STATIC / path.rsplit("/", 1)[1]).read_text()
    assert c.get("/web/server.json").json() == {"model": "demo", "api_key_required": False}
    assert c.get("/web/index.html").status_code == 404  # only the files the page loads


def test_page_is_public_under_an_api_key_and_the_api_is_not(engine):
    c = client(engine, api_key="secret")
    assert c.get("/").status_code == 200 and c.get("/web/chat.js").status_code == 200
    assert c.get("/web/server.json").json() == {"model": "demo", "api_key_required": True}
    assert c.get("/v1/models").status_code == 401
    assert c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}).status_code == 401
    assert c.get("/v1/models", headers={"Authorization": "Bearer secret"}).status_code == 200


def test_no_web_serves_no_page(engine):
    c = client(engine, api_key="secret", web=False)
    for path in ("/", "/web/chat.js", "/web/server.json"):
        assert c.get(path).status_code == 401  # not public any more: the key is asked first
    c = client(engine, web=False)
    r = c.get("/")
    assert r.status_code == 404 and r.json()["error"]["message"] == "no route GET /"
    assert c.get("/web/chat.js").status_code == 404


def test_page_loads_nothing_from_elsewhere():
    html = (STATIC / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert sorted(refs) == ["/web/chat.css", "/web/chat.js", "data:,"]
    for name in ("chat.js", "chat.css"):
        text = (STATIC / name).read_text()
        assert not re.search(r"@import|url\(|fetch\(\s*['\"`]https?:|//cdn", text), name
    fetched = re.findall(r"fetch\(\s*\"([^\"]+)\"", (STATIC / "chat.js").read_text())
    assert sorted(set(fetched)) == ["/v1/chat/completions", "/v1/models", "/web/server.json"]


def test_script_never_parses_text_as_html():
    js = (STATIC / "chat.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "createContextualFragment", "DOMParser"):
        assert sink not in js, sink


def test_serve_help_shows_no_web():
    from kimi_mlx.cli import app

    out = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert out.exit_code == 0 and "--no-web" in out.output and "chat page" in out.output
