"""The `kimi-mlx` command line: thin typer commands over the library."""

from __future__ import annotations

import sys

import typer

from .errors import KimiError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


@app.callback()
def _root():
    """Kimi Linear on MLX: convert, generate, chat, serve, bench, doctor."""


@app.command()
def generate(
    model: str = typer.Option("demo", "--model", "-m", help="checkpoint directory, hub repo id, or 'demo'"),
    prompt: str = typer.Option("Hello", "--prompt", "-p"),
    max_tokens: int = typer.Option(32, "--max-tokens"),
):
    """Generate text greedily from a prompt."""
    from .generate import greedy_tokens
    from .loading import load

    m, tok = load(model)
    if model in ("demo", "demo-random"):
        typer.echo("[demo model: random weights, the text is gibberish]", err=True)
    ids = tok.encode(prompt)
    out = []
    for t in greedy_tokens(m, ids, max_tokens, stop_ids=set(m.config.eos_token_ids)):
        out.append(t)
        typer.echo(tok.decode([t]), nl=False)
    typer.echo("")


@app.command()
def doctor():
    """Print the device and active fast paths; check each fast path against its reference here."""
    from .doctor import main as run_doctor

    if not run_doctor(typer.echo):
        typer.echo("error: a fast path disagrees with its reference on this device; "
                   "set KIMI_MLX_KDA=ref to run without it and report the output above", err=True)
        raise typer.Exit(1)


def main() -> None:
    try:
        app()
    except KimiError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
