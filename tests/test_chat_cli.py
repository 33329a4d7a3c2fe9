"""The real `kimi-mlx chat` program driven in a pseudo-terminal (pexpect) and through pipes, on the demo model."""

import os
import re
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest

pexpect = pytest.importorskip("pexpect")  # in the test extra; the GPU image lacks it

import kimi_mlx
from kimi_mlx import ChatSession

STATS = r"\[prompt: (\d+) tokens?[^\]]*\]"
FIRST = r"first token: id (\d+), logprob (-?[\d.]+)"
NO_STOP = ["--logit-bias", "258=-100", "--logit-bias", "257=-100"]  # demo-random's <|im_end|> and [EOS]


@pytest.fixture(scope="module")
def demo():
    return kimi_mlx.load("demo-random")


def env():
    return dict(os.environ, TERM="xterm-256color", KIMI_MLX_CACHE=os.environ["KIMI_MLX_CACHE"])


def spawn(*args):
    child = pexpect.spawn(sys.executable, ["-m", "kimi_mlx", "chat", "--model", "demo-random", *args], env=env(),
                          encoding="utf-8", timeout=90, dimensions=(50, 250))
    child.expect(">>> ")
    return child


def turn(child, text) -> tuple[int, str]:
    """(prompt tokens reported, everything printed for the reply)."""
    child.sendline(text)
    child.expect(STATS)
    n, shown = int(child.match.group(1)), child.before
    child.expect(">>> ")
    return n, shown


def command(child, text) -> str:
    child.sendline(text)
    child.expect(">>> ")
    return child.before


def quit_(child):
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def new_tokens(tok, text) -> int:
    """Tokens of one user turn plus the generation prompt (the built-in format has no separators)."""
    return len(tok.apply_chat_template([{"role": "user", "content": text}], tokenize=True))


def test_second_turn_reports_only_new_tokens(demo):
    _, tok = demo
    child = spawn("--max-tokens", "6", "--temp", "0", "--prefill-step-size", "40")
    n1, shown = turn(child, "hello there")
    assert "reading prompt" not in shown  # no bar for a prompt of one chunk
    n2, _ = turn(child, "and a second message")
    assert n1 == new_tokens(tok, "hello there")
    assert n2 == new_tokens(tok, "and a second message")
    long = "a long pasted paragraph " * 8
    n3, shown = turn(child, long)
    assert n3 == new_tokens(tok, long) and "reading prompt" in shown
    quit_(child)


def test_undo_then_the_same_message_repeats_the_reply(demo):
    child = spawn("--max-tokens", "12", "--temp", "1.0", "--seed", "3")
    turn(child, "first")
    _, a = turn(child, "tell me")
    assert "removed the last exchange" in command(child, "/undo")
    n, b = turn(child, "tell me")
    assert a == b and n == 1  # same draw; only the generation prompt's last token was fed again
    _, retried = turn(child, "/retry")
    assert retried.split("/retry", 1)[-1] != a.split("tell me", 1)[-1]
    quit_(child)


def test_save_quit_resume_continues_with_the_same_logits(demo, tmp_path):
    model, tok = demo
    path = tmp_path / "talk.session"
    a = spawn("--max-tokens", "5", "--temp", "0", "--system", "be brief")
    turn(a, "remember me")
    assert "saved" in command(a, f"/save {path}")
    turn(a, "next")
    first_a = re.search(FIRST, command(a, "/stats")).groups()
    quit_(a)

    b = spawn("--session", str(path), "--temp", "0")
    n, _ = turn(b, "next")
    first_b = re.search(FIRST, command(b, "/stats")).groups()
    quit_(b)
    assert n == new_tokens(tok, "next") and first_a == first_b

    saved = ChatSession.load(path, model, tok)
    prompt = saved.tokens + tok.apply_chat_template([{"role": "user", "content": "next"}], tokenize=True)
    logits = model(mx.array([prompt]))[0, -1]
    fresh = np.array(logits - mx.logsumexp(logits))
    assert int(first_b[0]) == int(np.argmax(fresh))
    assert float(first_b[1]) == pytest.approx(float(fresh.max()), abs=1e-4)


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on():
    child = spawn("--max-tokens", "100000", "--temp", "0", *NO_STOP)
    child.sendline("talk forever")
    child.expect("reserved")  # the reply is streaming
    time.sleep(0.5)
    child.sendintr()
    child.expect("interrupted: the partial reply is kept")
    child.expect(STATS)
    child.expect(">>> ")
    child.sendintr()  # at the prompt: a reminder, not an exit
    child.expect(r"Ctrl-D or /quit exits")
    command(child, "/set max_tokens 4")
    n, _ = turn(child, "still there?")
    context = int(re.search(r"context: ([\d,]+) / [\d,]+ tokens \([\d,]+ left\)", command(child, "/stats"))
                  .group(1).replace(",", ""))
    assert n > 1 and context > 100
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def run_piped(stdin: str, *args):
    return subprocess.run([sys.executable, "-m", "kimi_mlx", "chat", "--model", "demo-random", *args], input=stdin,
                          capture_output=True, text=True, env=env(), timeout=120)


def test_piped_mode_is_plain_with_one_reply_per_line(tmp_path):
    bad = tmp_path / "bad.session"
    bad.write_text("not a session")
    script = f'hello\n/undo\nhello\n/nope\n/load {bad}\n"""\ntwo\nlines\n"""\n'
    out = run_piped(script, "--max-tokens", "8", "--temp", "0.8", "--seed", "9", *NO_STOP)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\x1b[") == 0 and "\x1b[" not in out.stderr
    # /undo + the same line = the same reply: stdout starts with "R\nR\n"
    text = out.stdout
    assert any(text[k - 1] == "\n" and text[:k] == text[k : 2 * k] for k in range(1, len(text) // 2 + 1))
    assert len(re.findall(STATS, out.stderr)) == 3
    assert "error: unknown command /nope" in out.stderr
    assert f"error: {bad}: not a kimi-mlx session file" in out.stderr
    assert re.findall(STATS, out.stderr)[2] == str(len(kimi_mlx.load("demo-random")[1].apply_chat_template(
        [{"role": "user", "content": "two\nlines"}], tokenize=True)))


def test_stats_after_undo_shows_the_context_without_the_undone_exchange():
    out = run_piped("hello\n/stats\nsay more\n/stats\n/undo\n/stats\n", "--max-tokens", "4", "--temp", "0")
    assert out.returncode == 0, out.stderr
    one, two, undone = (int(n.replace(",", "")) for n in re.findall(r"context: ([\d,]+) / ", out.stderr))
    assert two > one and undone == one


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/dir"], "no such directory"),
    (["--session", "/no/such/file"], "no such session file"),
    (["--temp", "-1"], "temperature must be >= 0"),
])
def test_bad_start_is_one_line_and_exit_1(args, message):
    out = run_piped("hello\n", *args)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("error:") and message in out.stderr
    assert "Traceback" not in out.stderr
