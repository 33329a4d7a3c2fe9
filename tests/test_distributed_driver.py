"""`kimi-mlx generate/chat/serve --distributed` on two local ranks (ring backend) against one process.

Ranks start through mlx.launch (as a user would) or by hand with MLX_RANK / MLX_HOSTFILE, which lets a test
give each rank its own directory or kill one. The model is a tiny random checkpoint (tests/hf_oracle.py) whose
layers outweigh its embedding, so every reply depends on the whole context (state); decoding is greedy.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")

LAUNCH = str(Path(sys.executable).parent / "mlx.launch")


@pytest.fixture(scope="module")
def ckpt(hf_checkpoint) -> str:
    """Two MLA and four KDA layers, three per rank; the demo's byte-level tokenizer (512 ids)."""
    from kimi_mlx.demo import write_byte_tokenizer

    _, path = hf_checkpoint("kkmkkm", vocab_size=512, bos_token_id=256, eos_token_id=258, pad_token_id=511)
    write_byte_tokenizer(path)
    return str(path)


def chat(ckpt):
    return ["chat", "--model", ckpt, "--temp", "0", "--max-tokens", "8"]


def free_ports(n: int) -> int:
    """The first of n consecutive free local ports."""
    for _ in range(100):
        base = random.randrange(20000, 60000)
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError("no free ports")


def env() -> dict:
    return {**os.environ, "KIMI_MLX_CACHE": os.environ["KIMI_MLX_CACHE"]}


def one(args, stdin="", cwd=None):
    return subprocess.run([sys.executable, "-m", "kimi_mlx", *args], input=stdin, capture_output=True, text=True,
                          timeout=120, env=env(), cwd=cwd)


def launched(args, stdin="", cwd=None):
    """Two ranks through mlx.launch; it forwards stdin to every rank and never closes it: end with /quit."""
    cmd = [LAUNCH, "--backend", "ring", "-n", "2", "--starting-port", str(free_ports(2)), "--python", sys.executable,
           "--", "-m", "kimi_mlx", *args, "--distributed"]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120, env=env(), cwd=cwd)


def by_hand(tmp_path, args, cwds, **popen):
    """Two ranks started directly (no launcher to end the survivors), rank r in cwds[r]."""
    port = free_ports(2)
    hostfile = tmp_path / f"ring-{port}.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    return [subprocess.Popen([sys.executable, "-m", "kimi_mlx", *args, "--distributed"], cwd=cwds[r], text=True,
                             env={**env(), "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)},
                             stdin=subprocess.PIPE if r == 0 else subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, **popen) for r in range(2)]


def errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:") or "Traceback" in line]


def test_generate_two_ranks_equal_one_process(ckpt):
    args = ["generate", "--model", ckpt, "--temp", "0", "--max-tokens", "16", "-p", "tell me a story", "--quiet"]
    want, got = one(args), launched(args, "")
    assert want.returncode == 0 and got.returncode == 0, got.stderr
    assert got.stdout == want.stdout and len(want.stdout) > 10


def test_chat_two_ranks_equal_one_process_with_session_files(tmp_path, ckpt):
    script = ["hello there", "and a second message", "/undo", "and a second message", "/retry",
              "/save s1.kimi", "/reset", "a different first message", "/load s1.kimi", "third one", "/quit"]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    want = one(chat(ckpt), "\n".join(script) + "\n", cwd=tmp_path / "one")
    got = launched(chat(ckpt), "\n".join([*script[:-1], "/load ../one/s1.kimi", "fourth", "/quit"]) + "\n",
                   cwd=tmp_path / "two")
    assert want.returncode == 0 and got.returncode == 0, got.stderr
    replies = want.stdout.splitlines()
    assert len(replies) == 6 and len(set(replies)) >= 4  # the random model answers each context differently
    assert got.stdout.splitlines()[:6] == replies  # turn 2 continues turn 1's state, /load restores it exactly
    assert len(got.stdout.splitlines()) == 7  # the session of the one-process run is refused, the chat goes on
    assert errors(got.stderr) == ["error: ../one/s1.kimi: saved by a single-process run; a distributed run "
                                  "loads only sessions it saved"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["s1.kimi", "s1.kimi.rank1"]


def test_each_rank_loads_its_own_part_or_says_which_is_missing(tmp_path, ckpt):
    a, b, c = (tmp_path / n for n in "abc")
    for d in (a, b, c):
        d.mkdir()
    procs = by_hand(tmp_path, chat(ckpt), [a, b])  # rank 1 writes its part in its own directory
    out, _ = procs[0].communicate("first words\n/save s.kimi\n/quit\n", timeout=60)
    assert [p.wait(30) for p in procs] == [0, 0]
    assert (a / "s.kimi").exists() and (b / "s.kimi.rank1").exists()
    procs = by_hand(tmp_path, [*chat(ckpt), "--session", "s.kimi"], [a, b])
    resumed, _ = procs[0].communicate("next words\n/quit\n", timeout=60)
    assert [p.wait(30) for p in procs] == [0, 0] and len(resumed.splitlines()) == 1
    procs = by_hand(tmp_path, [*chat(ckpt), "--session", "s.kimi"], [a, c])  # rank 1's machine lacks its part
    _, err = procs[0].communicate("", timeout=60)
    assert procs[0].returncode == 1 and procs[1].wait(30) == 0
    assert errors(err) == [line for line in err.splitlines() if line.strip()]
    assert errors(err) == ["error: rank 1: s.kimi.rank1: no such session file"]


def test_lost_driver_ends_the_worker_with_one_line(tmp_path, ckpt):
    procs = by_hand(tmp_path, chat(ckpt), [tmp_path, tmp_path])
    procs[0].stdin.write("hello\n")
    procs[0].stdin.flush()
    assert procs[0].stdout.readline()  # a reply: both ranks are up
    t0 = time.monotonic()
    procs[0].send_signal(signal.SIGKILL)
    _, err = procs[1].communicate(timeout=30)
    assert time.monotonic() - t0 < 10 and procs[1].returncode == 1
    assert [line for line in err.splitlines() if line.strip()] == [
        "error: rank 1: lost contact with another rank ([ring] connection to a peer was lost); stopping"]
    procs[0].wait(10)


def start_server(procs, port: int):
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"server exited: {[p.communicate() for p in procs]}")
        try:
            if httpx.get(url + "/health", timeout=1).json()["status"] == "ok":
                return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError("server did not start")


def conversation(client, name: str) -> list:
    """Turn 1, turn 2 continuing it (a prefix-cache hit), a JSON-constrained reply; (text, cached tokens) each."""
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there " * 8}]
    out = []
    r = client.chat.completions.create(model=name, messages=msgs, max_tokens=12, temperature=0)
    out.append((r.choices[0].message.content, r.usage.prompt_tokens_details.cached_tokens))
    msgs += [{"role": "assistant", "content": "fine"}, {"role": "user", "content": "and then?"}]
    stream = client.chat.completions.create(model=name, messages=msgs, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    out.append(("".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                chunks[-1].usage.prompt_tokens_details.cached_tokens))
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}}}
    r = client.chat.completions.create(model=name, messages=msgs, max_tokens=24, temperature=0,
                                       response_format=fmt)
    out.append((r.choices[0].message.content, r.usage.prompt_tokens_details.cached_tokens))
    return out


def test_server_two_ranks_equal_one_process_and_a_killed_worker_ends_it(tmp_path, ckpt):
    port = free_ports(1)
    serve = ["serve", "--model", ckpt, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    single = subprocess.Popen([sys.executable, "-m", "kimi_mlx", *serve], env=env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        want = conversation(start_server([single], port), ckpt)
    finally:
        single.terminate()
        single.wait(30)
    assert want[1][1] > 0 and json.loads(want[2][0]) in ({"ok": True}, {"ok": False})
    procs = by_hand(tmp_path, serve, [tmp_path, tmp_path])
    try:
        client = start_server(procs, port)
        assert conversation(client, ckpt) == want
        stream = client.chat.completions.create(model=ckpt, max_tokens=2000, stream=True,
                                                messages=[{"role": "user", "content": "a long one"}])
        next(iter(stream))
        t0 = time.monotonic()
        procs[1].send_signal(signal.SIGKILL)  # mid-generation
        _, err = procs[0].communicate(timeout=60)
        assert time.monotonic() - t0 < 15 and procs[0].returncode == 1
        ours = "error: rank 0: lost contact with another rank ([ring] connection to a peer was lost); stopping"
        # MLX's ring backend may also write its own socket errors to stderr from its threads (lines starting
        # "[ring]", at times interleaved mid-line): ours must be the one line of any other kind, no traceback
        assert err.count(ours) == 1 and "Traceback" not in err
        assert all(line.startswith("[ring]") or ours in line for line in err.splitlines() if line.strip())
    finally:
        for p in procs:
            p.kill()
            p.wait(10)


def test_launcher_and_flag_must_go_together(ckpt):
    args = [sys.executable, "-m", "kimi_mlx", "generate", "--model", ckpt, "--max-tokens", "2"]
    alone = subprocess.run([*args, "--distributed"], capture_output=True, text=True, timeout=60, env=env())
    assert alone.returncode == 1 and errors(alone.stderr) == [
        "error: --distributed: no ranks to join (MLX_RANK is not set); start the command through mlx.launch, "
        "see docs/distributed.md"]
    launched_plain = subprocess.run(args, capture_output=True, text=True, timeout=60, env={**env(), "MLX_RANK": "1"})
    assert launched_plain.returncode == 1 and len(errors(launched_plain.stderr)) == 1
    assert "without --distributed" in launched_plain.stderr
