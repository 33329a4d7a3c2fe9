"""The chat page at / in a real browser: Debian's headless Chromium driven by Selenium (through the system's
chromedriver; nothing is downloaded), against one `kimi-mlx serve --model demo --api-key KEY` for the module.

Without Chromium these tests skip on a developer machine and fail under CI (CI=true), where .ci/run installs it;
KIMI_MLX_CHROMIUM and KIMI_MLX_CHROMEDRIVER point them at a browser and driver elsewhere than /usr/bin.
The screenshot of the page lands in tests/artifacts/web-chat.png (ignored by git).
"""

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from test_server import start_server, stop_server

CHROMIUM = os.environ.get("KIMI_MLX_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("KIMI_MLX_CHROMEDRIVER", "/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).parent / "artifacts"
KEY = "web-test-key"
LONG_PROMPT = "Write a long Python module for parsing config files."  # the demo at temperature 0: 2,000+ tokens


def _missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.isfile(path) or shutil.which(path)):
            return f"{path} not found (Debian: apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    missing = _missing()
    if missing:
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"browser tests need Chromium under CI: {missing}", pytrace=False)
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    d.set_script_timeout(30)
    yield d
    d.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("web"), "--api-key", KEY)
    yield s
    stop_server(s)


class Page:
    """The page in the browser, by its data-testid hooks."""

    def __init__(self, driver, server):
        self.d, self.server = driver, server

    def find(self, testid, within=None):
        from selenium.webdriver.common.by import By

        return (within or self.d).find_element(By.CSS_SELECTOR, f'[data-testid="{testid}"]')

    def all(self, testid, within=None):
        from selenium.webdriver.common.by import By

        return (within or self.d).find_elements(By.CSS_SELECTOR, f'[data-testid="{testid}"]')

    def wait(self, condition, timeout=20.0, what="condition"):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            value = condition()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def open(self, fresh=True):
        """Load the page with empty local storage (conversations, settings), giving the API key if asked."""
        self.d.get(self.server.url + "/")
        if fresh:
            self.d.execute_script("localStorage.clear()")
            self.d.refresh()
        self.wait(lambda: self.d.execute_script("return document.readyState") == "complete", what="the page")
        self.wait(lambda: self.find("model").text == "demo", what="the model's name")
        dialog = self.d.find_element("id", "key-dialog")
        if dialog.is_displayed():
            self.find("api-key").send_keys(KEY)
            self.find("api-key-submit").click()
            self.wait(lambda: not dialog.is_displayed(), what="the key dialog to close")

    def messages(self):
        return [(m.get_attribute("data-role"), m.find_element("css selector", ".body").text) for m in self.all("message")]

    def unfold(self, details_id):
        if not self.d.find_element("id", details_id).get_attribute("open"):
            self.d.find_element("css selector", f"#{details_id} summary").click()

    def set_setting(self, key, value):
        self.unfold("settings-panel")
        box = self.find(f"setting-{key}")
        box.clear()
        box.send_keys(str(value))

    def send(self, text):
        from selenium.webdriver.common.keys import Keys

        box = self.find("prompt")
        box.send_keys(text, Keys.ENTER)

    def busy(self):
        return self.find("stop").is_displayed()

    def wait_reply(self, timeout=30.0):
        """The last reply, once it has finished: (text, stats element)."""
        self.wait(lambda: not self.busy() and self.all("message")[-1].get_attribute("data-role") == "assistant",
                  timeout, "the reply to finish")
        last = self.all("message")[-1]
        return last.find_element("css selector", ".body").text, self.find("stats", last)

    def titles(self):
        return [c.find_element("css selector", ".pick").text for c in self.all("conversation")]

    def stored(self):
        return json.loads(self.d.execute_script("return localStorage.getItem('kimi-mlx.conversations')") or "{}")

    def console_errors(self):
        return [e for e in self.d.get_log("browser") if e["level"] == "SEVERE"]


@pytest.fixture
def page(driver, server):
    p = Page(driver, server)
    p.open()
    p.set_setting("temperature", 0)
    p.set_setting("max_tokens", 40)
    return p


def stats_of(stats) -> dict:
    return {k: int(stats.get_attribute(f"data-{k}")) for k in ("completion-tokens", "prompt-tokens", "cached-tokens")}


def test_send_streams_a_reply(page):
    # the text of the reply as drawn, each time it changes: several sizes before the last one = streamed
    page.d.execute_script("""
        window.__sizes = [];
        new MutationObserver(() => {
          const last = [...document.querySelectorAll('[data-testid=message][data-role=assistant] .body')].pop();
          if (last) window.__sizes.push(last.textContent.length);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    """)
    from selenium.webdriver.common.keys import Keys

    page.find("prompt").send_keys("line one", Keys.SHIFT, Keys.ENTER, Keys.NULL, LONG_PROMPT)
    assert page.messages() == []  # Shift+Enter only broke the line
    page.find("prompt").send_keys(Keys.ENTER)
    text, stats = page.wait_reply()
    assert page.messages()[0] == ("user", "line one\n" + LONG_PROMPT)
    assert text.strip() and page.find("prompt").get_attribute("value") == ""
    n = stats_of(stats)
    assert n["completion-tokens"] == 40 and n["prompt-tokens"] > 10
    assert "40 tokens" in stats.text and "tok/s" in stats.text and "hit max tokens" in stats.text
    sizes = [s for s in page.d.execute_script("return window.__sizes") if s]
    assert len(set(sizes)) >= 3, sizes  # drawn piece by piece, not once at the end
    assert page.all("copy-reply") and page.all("regenerate")


def test_second_turn_reads_only_its_new_tokens(page):
    page.unfold("system-box")
    page.find("system").send_keys("You write Python.")
    page.send("def read_lines(path):")
    _, s1 = page.wait_reply()
    first = stats_of(s1)
    page.send("And now write it again, shorter.")
    _, s2 = page.wait_reply()
    second = stats_of(s2)
    # turn 2 restores the state after turn 1 (reply included) and reads only its own new message
    assert second["cached-tokens"] >= first["prompt-tokens"] + first["completion-tokens"] - 1
    assert f"{second['cached-tokens']} of {second['prompt-tokens']} prompt tokens cached" in s2.text
    sent = page.stored()[page.d.execute_script("return JSON.parse(localStorage.getItem('kimi-mlx.current'))")]
    assert sent["system"] == "You write Python."
    ARTIFACTS.mkdir(exist_ok=True)
    page.d.save_screenshot(str(ARTIFACTS / "web-chat.png"))
    print(f"screenshot: {ARTIFACTS / 'web-chat.png'}")


def health(server) -> dict:
    return httpx.get(server.url + "/health", timeout=5).json()


def test_stop_mid_reply_frees_the_server(page, server):
    page.set_setting("max_tokens", 4000)
    page.send(LONG_PROMPT)
    page.wait(lambda: len(page.messages()[-1][1]) > 40, what="the reply to start")
    assert health(server)["busy"]
    page.find("stop").click()
    t0 = time.monotonic()
    page.wait(lambda: (lambda h: not h["busy"] and h["waiting"] == 0)(health(server)), 5, "the server to go idle")
    assert time.monotonic() - t0 < 5  # the rest of 4,000 tokens would take far longer: the turn was cancelled
    page.wait(lambda: not page.busy(), what="the page to leave its busy state")
    last = page.all("message")[-1]
    assert last.get_attribute("data-role") == "assistant" and last.find_element("css selector", ".body").text
    assert page.find("stats", last).text.startswith("stopped after")
    assert page.find("send").is_displayed()


def test_regenerate_and_edit_a_user_turn(page):
    page.send("def read_lines(path):")
    page.wait_reply()
    page.send("second question")
    _, stats = page.wait_reply()
    first = stats_of(stats)
    assert [r for r, _ in page.messages()] == ["user", "assistant"] * 2
    page.find("regenerate").click()
    _, stats = page.wait_reply()
    assert [r for r, _ in page.messages()] == ["user", "assistant"] * 2
    again = stats_of(stats)
    # the same prompt again, read from the snapshot at the end of the last user message
    assert again["prompt-tokens"] == first["prompt-tokens"] and again["cached-tokens"] >= first["cached-tokens"]
    page.all("edit")[0].click()
    box = page.find("edit-box")
    box.clear()
    box.send_keys("class Reader:")
    page.find("edit-send").click()
    page.wait_reply()
    assert [m for m in page.messages()][0] == ("user", "class Reader:")
    assert [r for r, _ in page.messages()] == ["user", "assistant"]  # the turns after the edited one are gone


def test_reload_keeps_the_conversation_and_the_sidebar_manages_them(page):
    page.send("def read_lines(path):")
    page.wait_reply()
    before = page.messages()
    page.d.refresh()
    page.wait(lambda: page.messages() == before, what="the conversation after a reload")
    assert page.titles() == ["def read_lines(path):"]
    page.find("new-chat").click()
    assert page.messages() == []
    page.send("class Reader:")
    page.wait_reply()
    assert page.titles() == ["class Reader:", "def read_lines(path):"]
    page.all("conversation")[1].find_element("css selector", ".pick").click()
    assert page.messages() == before
    page.find("delete-chat", page.all("conversation")[0]).click()  # the other one
    assert page.titles() == ["def read_lines(path):"]
    assert [c["title"] for c in page.stored().values()] == ["def read_lines(path):"]


def test_server_errors_show_in_the_page(page):
    page.set_setting("temperature", 5)
    page.send("hello")
    text, _ = page.wait_reply()
    err = page.find("error", page.all("message")[-1])
    assert "temperature" in err.text and text == err.text  # the server's message, not a blank reply
    page.console_errors()  # the 400 is logged as a failed resource; the console test checks a clean session


MALICIOUS = """# Title <img src=x onerror="window.__xss=1">
Some **bold** and *italic* text with `<b>code</b>` and a [safe link](https://example.com/a?b=1).
<script>window.__xss = 2</script>
[bad link](javascript:window.__xss=3) and [other](JaVaScRiPt:alert(1))
- item <iframe src="javascript:window.__xss=4"></iframe>
- item two

```html
<img src=y onerror="window.__xss=5">
```
"""


def test_model_output_is_never_html(page):
    conv = {"id": "x1", "title": "xss", "system": "", "updated": 1,
            "messages": [{"role": "user", "content": "<img src=z onerror='window.__xss=6'>"},
                         {"role": "assistant", "content": MALICIOUS}]}
    page.d.execute_script("localStorage.setItem('kimi-mlx.conversations', arguments[0]);"
                          "localStorage.setItem('kimi-mlx.current', '\"x1\"');", json.dumps({"x1": conv}))
    page.d.refresh()
    page.wait(lambda: len(page.all("message")) == 2, what="the stored conversation")
    msgs = page.d.find_element("id", "messages")
    for tag in ("img", "script", "iframe"):
        assert msgs.find_elements("css selector", tag) == [], tag
    assert page.d.execute_script("return window.__xss") is None
    user, reply = page.all("message")
    assert user.text.startswith("<img src=z onerror='window.__xss=6'>")
    body = reply.find_element("css selector", ".body")
    assert body.find_element("css selector", "h1").text == 'Title <img src=x onerror="window.__xss=1">'
    assert body.find_element("css selector", "strong").text == "bold"
    assert body.find_element("css selector", "em").text == "italic"
    assert body.find_element("css selector", "p code").text == "<b>code</b>"
    links = body.find_elements("css selector", "a")
    assert [(a.text, a.get_attribute("href")) for a in links] == [("safe link", "https://example.com/a?b=1")]
    assert "[bad link](javascript:window.__xss=3)" in body.text
    assert len(body.find_elements("css selector", "ul li")) == 2
    code = body.find_element("css selector", ".code pre code")
    assert code.text == '<img src=y onerror="window.__xss=5">'
    # the code block's copy button copies the code as text
    page.d.execute_script("window.__copied = []; navigator.clipboard.writeText = async (t) => { window.__copied.push(t); };")
    page.find("copy-code", body).click()
    page.wait(lambda: page.d.execute_script("return window.__copied.length"), what="the copy")
    assert page.d.execute_script("return window.__copied") == ['<img src=y onerror="window.__xss=5">']
    page.find("copy-reply", reply).click()  # and the reply's button, the reply as the model wrote it
    page.wait(lambda: page.d.execute_script("return window.__copied.length") == 2, what="the second copy")
    assert page.d.execute_script("return window.__copied")[1] == MALICIOUS


def _code(lang, text):
    return (f'<div class="code"><div class="code-head"><span>{lang}</span><button type="button" class="copy" '
            f'data-testid="copy-code">Copy</button></div><pre><code>{text}</code></pre></div>')


def _a(href, text):
    return f'<a href="{href}" target="_blank" rel="noopener noreferrer">{text}</a>'


MARKDOWN = [
    ("**b** *i* `a*b` snake_case_name __init__ 2 * 3", "<p><strong>b</strong> <em>i</em> <code>a*b</code> "
     "snake_case_name <strong>init</strong> 2 * 3</p>"),
    ("# One\n## Two ##\ntext\nnext line", "<h1>One</h1><h2>Two</h2><p>text<br>next line</p>"),
    ("- a\n- b\n  - c\n\n3. x\n4. y", "<ul><li>a</li><li><p>b</p><ul><li>c</li></ul></li></ul>"
     '<ol start="3"><li>x</li><li>y</li></ol>'),
    ("> quote **b**\n\n---", "<blockquote><p>quote <strong>b</strong></p></blockquote><hr>"),
    ("~~~py\nx = 1\n~~~\n    indented\n\n```\nstill streaming", _code("py", "x = 1") + _code("", "indented")
     + _code("", "still streaming")),
    ("[t](https://a.b/c) <https://d.e> see https://f.g/h. [x](javascript:alert(1)) [y](data:text/html,z) [m](mailto:a@b.c)",
     f'<p>{_a("https://a.b/c", "t")} {_a("https://d.e/", "https://d.e")} see {_a("https://f.g/h", "https://f.g/h")}. '
     f'[x](javascript:alert(1)) [y](data:text/html,z) {_a("mailto:a@b.c", "m")}</p>'),
    ("[https://a.b **c**](https://a.b/)", f'<p>{_a("https://a.b/", "https://a.b <strong>c</strong>")}</p>'),
]


def test_markdown_renders_as_expected(page):
    got = page.d.execute_script("return arguments[0].map((text) => { const box = document.createElement('div');"
                                "box.append(markdown(text)); return box.innerHTML; })", [t for t, _ in MARKDOWN])
    assert [(t, g) for (t, _), g in zip(MARKDOWN, got)] == MARKDOWN


def test_api_key_asked_once_per_session(driver, server):
    p = Page(driver, server)
    driver.get(server.url + "/")
    driver.execute_script("sessionStorage.clear()")
    driver.refresh()
    p.wait(lambda: p.find("api-key").is_displayed(), what="the key dialog")
    p.find("api-key").send_keys("wrong")
    p.find("api-key-submit").click()
    p.wait(lambda: "refused" in p.find("api-key-error").text, what="the wrong key's message")
    assert driver.execute_script("return sessionStorage.getItem('kimi-mlx.api-key')") is None
    p.find("api-key").clear()
    p.find("api-key").send_keys(KEY)
    p.find("api-key-submit").click()
    p.wait(lambda: not p.find("api-key").is_displayed(), what="the dialog to close")
    assert driver.execute_script("return sessionStorage.getItem('kimi-mlx.api-key')") == KEY
    assert driver.execute_script("return localStorage.getItem('kimi-mlx.api-key')") is None
    driver.refresh()
    p.wait(lambda: p.find("model").text == "demo", what="the page")
    assert not p.find("api-key").is_displayed()
    p.console_errors()  # the wrong key's 401 is logged as a failed resource


def test_console_has_no_errors(page):
    page.console_errors()  # what earlier tests left
    page.d.refresh()
    page.wait(lambda: page.find("model").text == "demo", what="the page")
    page.send("def read_lines(path):")
    page.wait_reply()
    page.set_setting("max_tokens", 4000)
    page.send(LONG_PROMPT)
    page.wait(lambda: len(page.messages()[-1][1]) > 40, what="the reply to start")
    page.find("stop").click()
    page.wait(lambda: not page.busy(), what="the stop")
    page.d.refresh()
    page.wait(lambda: len(page.all("message")) == 4, what="the conversation after a reload")
    assert page.console_errors() == []


def test_reply_cut_by_a_reload_is_marked_not_blank(page):
    page.set_setting("max_tokens", 4000)
    page.send(LONG_PROMPT)
    page.wait(lambda: len(page.stored().popitem()[1]["messages"][-1]["content"]) > 40, what="the reply saved mid-stream")
    page.d.refresh()
    page.wait(lambda: len(page.all("message")) == 2, what="the conversation after a reload")
    last = page.all("message")[-1]
    assert last.find_element("css selector", ".body code").text  # what had come before the reload
    assert page.find("error", last).text == "the page was closed before this reply ended"
    page.find("regenerate", last).click()  # and it can be asked again
    page.wait(lambda: page.busy(), what="the new reply")
    page.find("stop").click()
    page.wait(lambda: not page.busy(), what="the stop")
