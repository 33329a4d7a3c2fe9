"""The `kimi-mlx` command line: thin typer commands over the library."""

from __future__ import annotations

import sys

import typer
from typer.core import TyperCommand, TyperGroup

from .errors import KimiError


class _FlagsTakeNoValue:
    """typer's --help prints every option's type, a flag's too (`--raw <bool>`), as if the flag took a value;
    an empty metavar is printed as nothing, so flags (--help among them) get one."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for p in params:
            if getattr(p, "is_flag", False) and p.metavar is None:
                p.metavar = ""
        return params


class _Command(_FlagsTakeNoValue, TyperCommand):
    pass


class _Group(_FlagsTakeNoValue, TyperGroup):
    pass


class _Typer(typer.Typer):
    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or _Command, **kwargs)


app = _Typer(cls=_Group, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"kimi-mlx {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="print the version and exit")):
    """Kimi Linear on MLX: convert, generate, chat, serve, bench, doctor."""


from .cli_options import (D, Distributed, Draft, ExpertsMemory, FrequencyPenalty, LogitBias, MaxTokens, MinP,  # noqa: E402
                          Model, Ngram, NumDraft,
                          PrefillStepSize, PresencePenalty, RepetitionContext, RepetitionPenalty, Seed, Stop, System,
                          Temperature, TopK, TopP, generation_options)


@app.command()
def generate(
    model: Model = "demo",
    prompt: str = typer.Option("Hello", "--prompt", "-p", help="the prompt; '-' reads it from stdin"),
    system: System = None,
    raw: bool = typer.Option(False, "--raw", help="use the prompt as is, without the chat template"),
    max_tokens: MaxTokens = D.max_tokens,
    temperature: Temperature = D.temperature,
    top_p: TopP = D.top_p,
    top_k: TopK = D.top_k,
    min_p: MinP = D.min_p,
    repetition_penalty: RepetitionPenalty = D.repetition_penalty,
    repetition_context_size: RepetitionContext = D.repetition_context_size,
    presence_penalty: PresencePenalty = D.presence_penalty,
    frequency_penalty: FrequencyPenalty = D.frequency_penalty,
    logit_bias: LogitBias = None,
    seed: Seed = None,
    stop: Stop = None,
    prefill_step_size: PrefillStepSize = D.prefill_step_size,
    draft: Draft = None,
    num_draft: NumDraft = D.num_draft,
    ngram: Ngram = D.ngram,
    verbose: bool = typer.Option(True, "--verbose/--quiet", help="print token counts and speeds to stderr"),
    n: int = typer.Option(1, "--n", "-n", min=1, help="samples of the prompt, decoded together as one batch (one "
                          "prefill; with --seed S, the samples draw with seeds S, S+1, ...)"),
    distributed: Distributed = False,
    experts_memory: ExpertsMemory = None,
):
    """Generate text from a prompt (sent as a user message through the chat template unless --raw)."""
    from .generate import stats_line, stream_generate
    from .loading import load

    opts = generation_options(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        repetition_penalty=repetition_penalty, repetition_context_size=repetition_context_size,
        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, logit_bias=logit_bias, seed=seed,
        stop=stop, prefill_step_size=prefill_step_size, draft=draft, num_draft=num_draft, ngram=ngram,
    )
    m, tok = load(model, distributed=distributed, experts_memory_gb=experts_memory)  # --distributed: rank 0 returns
    text = sys.stdin.read() if prompt == "-" else prompt
    if model == "demo-random":
        typer.echo("[demo model: random weights, the text is gibberish]", err=True)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    if n > 1:
        return _samples(m, tok, text if raw else messages, n, opts, verbose)
    last = None
    for r in stream_generate(m, tok, text if raw else messages, **opts.__dict__):
        sys.stdout.write(r.text)
        sys.stdout.flush()
        last = r
    typer.echo("")
    if verbose and last is not None:
        typer.echo(stats_line(last), err=True)
        if m.offload is not None:
            typer.echo(m.offload.line(), err=True)


def _samples(m, tok, prompt, n: int, opts, verbose: bool) -> None:
    """n samples of one prompt through the batch engine, printed one after another as each finishes (headed
    `[sample j]`); the numbers line sums the batch's decode."""
    import time

    from .batch import stream_batch

    texts, done, tokens, first = [""] * n, [None] * n, 0, None
    for j, r in stream_batch(m, tok, [prompt], n=n, max_batch=n, **opts.__dict__):
        first = first or time.perf_counter()
        texts[j] += r.text
        tokens += 1
        if r.finish_reason:
            done[j] = r
            typer.echo(f"[sample {j + 1}]\n{texts[j]}\n")
    if verbose and first is not None:
        took = time.perf_counter() - first
        r = max((d for d in done if d), key=lambda d: d.generation_tokens)
        spec = ""
        if r.spec is not None:  # the samples' speculation summed
            from .speculate import SpecStats

            total = SpecStats()
            for d in done:
                if d is not None:
                    for f in ("drafted", "accepted", "forwards", "tokens"):
                        setattr(total, f, getattr(total, f) + getattr(d.spec, f))
            spec = f" | {total.line()}"
        typer.echo(f"prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tok/s | {n} samples: {tokens} tokens, "
                   f"{(tokens - n) / took if took > 0 else 0.0:.1f} tok/s in all | peak memory {r.peak_memory:.2f} GB"
                   f"{spec}", err=True)


@app.command()
def chat(
    model: Model = "demo",
    system: System = None,
    session: str = typer.Option(None, "--session", help="resume a conversation saved with /save"),
    max_tokens: MaxTokens = D.max_tokens,
    temperature: Temperature = D.temperature,
    top_p: TopP = D.top_p,
    top_k: TopK = D.top_k,
    min_p: MinP = D.min_p,
    repetition_penalty: RepetitionPenalty = D.repetition_penalty,
    repetition_context_size: RepetitionContext = D.repetition_context_size,
    presence_penalty: PresencePenalty = D.presence_penalty,
    frequency_penalty: FrequencyPenalty = D.frequency_penalty,
    logit_bias: LogitBias = None,
    seed: Seed = None,
    stop: Stop = None,
    prefill_step_size: PrefillStepSize = D.prefill_step_size,
    draft: Draft = None,
    num_draft: NumDraft = D.num_draft,
    ngram: Ngram = D.ngram,
    distributed: Distributed = False,
    experts_memory: ExpertsMemory = None,
):
    """Chat in the terminal; the model state is kept across turns (/help inside lists the commands)."""
    from .chat import run_chat

    opts = generation_options(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        repetition_penalty=repetition_penalty, repetition_context_size=repetition_context_size,
        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, logit_bias=logit_bias, seed=seed,
        stop=stop, prefill_step_size=prefill_step_size, draft=draft, num_draft=num_draft, ngram=ngram,
    )
    run_chat(model, opts, system, session, distributed, experts_memory)


from .server import ServeOptions as S, format_bytes  # noqa: E402


@app.command()
def serve(
    model: Model = "demo",
    host: str = typer.Option(S.host, "--host", help="address to listen on (loopback by default)"),
    port: int = typer.Option(S.port, "--port", help="TCP port to listen on"),
    api_key: str | None = typer.Option(None, "--api-key", envvar="KIMI_MLX_API_KEY",
                                       help="require 'Authorization: Bearer KEY' on /v1/*"),
    max_queue: int = typer.Option(S.max_queue, "--max-queue", help="requests that may wait; more get 503"),
    prefix_cache_bytes: str = typer.Option(format_bytes(S.prefix_cache_bytes), "--prefix-cache-bytes",
                                           help="memory for prefix-state snapshots (e.g. 512MiB, 8GiB; 0 = off)"),
    snapshot_interval: int = typer.Option(S.snapshot_interval, "--snapshot-interval",
                                          help="also snapshot every this many prompt tokens"),
    prefill_step_size: PrefillStepSize = D.prefill_step_size,
    max_body_bytes: str = typer.Option(format_bytes(S.max_body_bytes), "--max-body-bytes",
                                       help="largest request body accepted"),
    allowed_origin: list[str] | None = typer.Option(None, "--allowed-origin",
                                                    help="enable CORS for this origin (repeatable; off by default)"),
    log_level: str = typer.Option(S.log_level, "--log-level", help="uvicorn's log level: critical | error | "
                                  "warning | info | debug | trace"),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=1,
                                          help="reply cap for requests that set none (default: up to the context "
                                               "limit, as OpenAI's API does)"),
    served_model_name: list[str] | None = typer.Option(None, "--served-model-name",
                                                       help="id /v1/models lists and replies report (repeatable; "
                                                            "default: the checkpoint's name)"),
    strict_model_name: bool = typer.Option(False, "--strict-model-name",
                                           help="answer only the served names (others: 404); by default any "
                                                "'model' in a request means this model"),
    no_web: bool = typer.Option(False, "--no-web", help="don't serve the chat page at / (the API only)"),
    draft: Draft = None,
    num_draft: NumDraft = D.num_draft,
    ngram: Ngram = D.ngram,
    max_batch: int = typer.Option(S.max_batch, "--max-batch", min=1,
                                  help="sequences decoded together (continuous batching; a request with n "
                                       "choices takes n rows)"),
    batch_memory: str = typer.Option("auto", "--batch-memory",
                                     help="memory the sequences' states may hold (e.g. 16GiB; auto: the device's "
                                          "memory less the weights, the prefix cache and 2 GiB); requests start "
                                          "reserved a page ahead of their length and the latest started is paused "
                                          "while the batch would outgrow it"),
    distributed: Distributed = False,
    experts_memory: ExpertsMemory = None,
):
    """Serve the model over an OpenAI-compatible HTTP API: chat completions, completions (with prompt scoring),
    the Responses API (with previous_response_id), tools, JSON output."""
    from .distributed import launch_rank
    from .server import parse_bytes, serve as run_server

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key and launch_rank() == 0:
        typer.echo(f"warning: listening on {host} without --api-key: anyone who can reach it can use the model",
                   err=True)
    opts = S(host, port, api_key, max_queue, parse_bytes(prefix_cache_bytes, "--prefix-cache-bytes"),
             snapshot_interval, prefill_step_size, parse_bytes(max_body_bytes, "--max-body-bytes"),
             tuple(allowed_origin or ()), log_level, distributed, max_tokens, tuple(served_model_name or ()),
             strict_model_name, web=not no_web, experts_memory_gb=experts_memory, max_batch=max_batch,
             draft=draft, num_draft=num_draft, ngram=ngram,
             batch_memory=None if batch_memory == "auto" else parse_bytes(batch_memory, "--batch-memory"))
    run_server(model, opts)


@app.command()
def doctor(
    report: str = typer.Option(None, "--report", metavar="FILE", help="also write a Markdown report to attach to "
                               "a bug report: machine, versions, every check with its error, active paths, a speed "
                               "sample"),
    speed: bool = typer.Option(True, "--speed/--no-speed", help="with --report: measure decode speed, 10 s on the "
                               "demo model and 10 s at the full shape where the memory allows"),
    model: str = typer.Option(None, "--model", "-m", help="also list the paths this checkpoint's layers take here "
                              "(directory, hub repo id or 'demo'), and why a kernel does not take one"),
):
    """Print the device and active fast paths; check each fast path against its reference here."""
    from .doctor import main as run_doctor
    from .loading import tell_if_cold_cache

    tell_if_cold_cache()  # its checks run compiled steps too
    loaded = None
    if model is not None:
        from .loading import load

        loaded = load(model)[0]
    if not run_doctor(typer.echo, report=report, speed=speed, model=loaded):
        typer.echo("error: a fast path disagrees with its reference on this device; "
                   "set KIMI_MLX_KDA=ref to run without it and report the output above", err=True)
        raise typer.Exit(1)


@app.command()
def convert(
    src: str = typer.Argument(..., metavar="SRC", help="HF checkpoint directory or hub repo id"),
    out: str = typer.Argument(..., metavar="OUT", help="output directory (refused if it exists, unless --force)"),
    bits: int | None = typer.Option(None, "--bits", "-b", help="quantize: affine 2/3/4/5/6/8, mxfp4/nvfp4 4, mxfp8 8"),
    group_size: int | None = typer.Option(None, "--group-size", "-g",
                                          help="affine 32/64/128 (64), mxfp4/mxfp8 32, nvfp4 16"),
    mode: str | None = typer.Option(None, "--mode", help="affine | mxfp4 | mxfp8 | nvfp4"),
    recipe: str | None = typer.Option(None, "--recipe",
                                      help="kimi (default) | uniform | mixed_2_6 | mixed_3_4 | mixed_3_6 | mixed_4_6"),
    override: list[str] | None = typer.Option(None, "--override",
                                              help="PATTERN=SPEC, e.g. '*.experts.down_proj=6', 'lm_head=none'"),
    dtype: str | None = typer.Option(None, "--dtype", help="bfloat16 | float16 | float32 for unquantized weights "
                                     "and quantization scales (default: the source's)"),
    revision: str | None = typer.Option(None, "--revision", help="hub revision (branch, tag or commit)"),
    force: bool = typer.Option(False, "--force", help="replace OUT if it exists"),
    no_report: bool = typer.Option(False, "--no-report", help="skip the quality report of a quantized conversion"),
):
    """Convert an HF Kimi Linear checkpoint for kimi-mlx, optionally quantized (no --bits/--mode/--recipe: none)."""
    import signal

    from .weights.convert import ConvertOptions, convert as run_convert

    opts = ConvertOptions(bits, group_size, mode, recipe, override or [], dtype, force, not no_report, revision)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up like Ctrl-C
    try:
        run_convert(src, out, opts, log=lambda line: typer.echo(line, err=True))
    except KeyboardInterrupt:
        raise KimiError(f"interrupted; {out} was not written") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise KimiError(f"'{text}' is not a comma-separated list of token counts, e.g. 1024,32768") from None


@app.command()
def bench(
    model: str = typer.Option(None, "--model", "-m", help="a checkpoint to measure (default: random weights)"),
    shape: str = typer.Option("small", "--shape",
                              help="random-weight shape: full (48B-A3B), small, or narrow (the full graph, tiny widths)"),
    contexts: str = typer.Option("1024,32768", "--contexts", help="decode at these context lengths"),
    prefill: str = typer.Option("1024,8192", "--prefill", help="prefill these prompt lengths"),
    decode_tokens: int = typer.Option(32, "--decode-tokens", help="tokens decoded (timed) at each context"),
    step: int = typer.Option(0, "--step", help="prefill step tokens for both models (0: each its own default)"),
    bits: int = typer.Option(4, "--bits", help="random weights: quantization bits (0 = unquantized)"),
    peer: bool = typer.Option(True, "--peer/--no-peer", help="also measure mlx-lm on the same weights"),
    peer_model: str = typer.Option(None, "--peer-model", help="with --model: an mlx-lm checkpoint to compare"),
    bandwidth: float = typer.Option(None, "--bandwidth", help="device memory bandwidth in GB/s"),
    step_at: str = typer.Option("", "--step-at", help="time the prefill step ending at these contexts "
                                "(long prompts: peak memory, and the whole prefill estimated from them)"),
    rounds: int = typer.Option(1, "--rounds", min=1, help="decode each context this many times per runner, "
                               "alternating them (medians reported: steadier on a shared machine)"),
    experts_memory: ExpertsMemory = None,
    batch: str = typer.Option("", "--batch", help="also decode this many sequences together at each context, e.g. "
                              "1,2,4,8,16: aggregate tok/s and per-sequence latency (mlx-lm: its BatchGenerator)"),
):
    """Prefill and decode speed, peak memory and bandwidth use, against mlx-lm in the same run."""
    from . import bench as b
    from .loading import tell_if_cold_cache

    if experts_memory is not None and not model:
        raise KimiError("--experts-memory streams experts from a checkpoint on disk: give --model too "
                        "(benchmarks/offload.py writes a full-shape random one)")
    if shape not in b.SHAPES:
        raise KimiError(f"--shape {shape}: choose one of {', '.join(b.SHAPES)}")
    if peer and not model:
        try:
            import mlx_lm  # noqa: F401
        except ImportError:
            raise KimiError("mlx-lm is not installed: pip install 'kimi-mlx[bench]', or pass --no-peer") from None
    tell_if_cold_cache()
    b.run(shape, _ints(contexts), _ints(prefill), decode_tokens, step, bits, peer=peer and not model,
          bandwidth_gbs=bandwidth, model_path=model and str(_resolve(model)), peer_model=peer_model,
          step_at=_ints(step_at) if step_at else (), rounds=rounds, experts_memory_gb=experts_memory,
          batches=_batches(batch))


def _batches(text: str) -> tuple[int, ...]:
    sizes = _ints(text) if text else ()
    if any(b < 1 for b in sizes):
        raise KimiError(f"--batch {text}: batch sizes are 1 or more, e.g. 1,2,4,8,16")
    return sizes


def _resolve(model: str):
    from .loading import resolve

    return resolve(model)


def main(command: str | None = None, prog_name: str | None = None) -> None:
    """`kimi-mlx`; given a command, that command alone under prog_name (convert.py and chat.py, whose --help
    then shows how they are called)."""
    try:
        if command:
            typer.main.get_command(app).commands[command].main(prog_name=prog_name)
        else:
            app()
    except KimiError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
