"""What the command line shows: --help of every command, the script wrappers' usage, serve's port check, counts."""

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from kimi_mlx.cli import app
from kimi_mlx.errors import KimiError

REPO = Path(__file__).parent.parent
COMMANDS = sorted(typer.main.get_command(app).commands)


def test_every_option_has_help_text():
    group = typer.main.get_command(app)
    ctx = typer.main.get_command(app).make_context("kimi-mlx", [], resilient_parsing=True)
    missing = [f"{name} {p.opts[0]}" for name, cmd in group.commands.items()
               for p in cmd.get_params(cmd.make_context(name, [], parent=ctx, resilient_parsing=True))
               if not (p.help or "").strip()]
    assert missing == []


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_shows_no_value_type_after_a_flag(command):
    out = CliRunner().invoke(app, [*command.split(), "--help"], env={"COLUMNS": "200"}, terminal_width=200)
    assert out.exit_code == 0, out.output
    assert "<bool>" not in out.output
    assert re.search(r"--help\s+Show this message and exit", out.output)


@pytest.mark.parametrize("script, usage", [("convert.py", "python convert.py [OPTIONS] {SRC} {OUT}"),
                                           ("chat.py", "python chat.py [OPTIONS]")])
def test_script_wrappers_show_their_own_usage(script, usage):
    out = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True,
                         env={"COLUMNS": "200", "PATH": ""}, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert f"Usage: {usage}" in out.stdout, out.stdout


def test_serve_reports_a_port_in_use_before_loading(monkeypatch):
    from kimi_mlx import loading
    from kimi_mlx.server import ServeOptions, serve

    def never(*a, **k):
        raise AssertionError("the model was loaded before the port was checked")

    monkeypatch.setattr(loading, "load", never)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(KimiError, match=f"port {port} on 127.0.0.1 is in use .*--port"):
            serve("demo", ServeOptions(port=port))
        out = subprocess.run([sys.executable, "-m", "kimi_mlx", "serve", "--model", "demo", "--port", str(port)],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and out.stderr.startswith("error: port"), out.stderr


def test_counts_are_singular_for_one():
    from types import SimpleNamespace

    from kimi_mlx.generate import stats_line
    from kimi_mlx.state import ContextUsage
    from kimi_mlx.words import count

    r = SimpleNamespace(prompt_tokens=1, prompt_tps=1.0, generation_tokens=1, generation_tps=0.0, peak_memory=0.0)
    assert stats_line(r).startswith("prompt: 1 token, 1.0 tok/s | generation: 1 token, ")
    r.prompt_tokens = r.generation_tokens = 2
    assert "prompt: 2 tokens" in stats_line(r) and "generation: 2 tokens" in stats_line(r)
    assert str(ContextUsage(0, 1)) == "0 / 1 token (1 left)"
    assert count(12288, "token", ",") == "12,288 tokens" and count(1, "message") == "1 message"
