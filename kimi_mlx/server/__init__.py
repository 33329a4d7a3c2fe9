"""`kimi-mlx serve`: a local OpenAI-compatible server with prefix-state reuse across turns.

    kimi-mlx serve --model path/to/Kimi-Linear-48B-A3B-Instruct --port 8000 [--api-key KEY]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything")
    client.chat.completions.create(model="Kimi-Linear-48B-A3B-Instruct", messages=[...], stream=True)

Any `model` name is answered by the one model (--strict-model-name makes others a 404); replies report the
first --served-model-name (default: the checkpoint's directory name or repo id). Clients resend the whole
conversation each turn (or, on /v1/responses, name the previous response); the server restores the state
snapshot of the longest prefix it has seen (snapshots are taken at every message end, every
--snapshot-interval prompt tokens and after every reply) and feeds only the rest;
usage.prompt_tokens_details.cached_tokens says how many tokens were reused. One engine thread batches requests
continuously: up to --max-batch sequences decode together, a new request's prompt is fed a step at a time
between their decode steps and it joins the batch when fed; `n` choices are n rows sharing one prefill. The
rows' states are held within --batch-memory optimistically: a request starts when its rows fit with every row
reserved a page ahead of its current length (not at its longest, which for a request without max_tokens is
the whole context), and before each decode step, if the step would go past the budget, the most recently started
request is preempted: its rows' states are copied out of the batch and it resumes, first started first and
before new requests start, when they fit again; its client sees only a pause in the stream (the same tokens and
usage). So concurrent requests never outgrow the budget (a request alone always runs); the cost is that a
preempted one waits. Up to --max-queue wait, more get a 503.

Modules: app (routes, auth, SSE), schemas (request bodies), requests (request -> TurnSpec),
openai_format (chat and completion objects), responses (the Responses API and its store), worker (the
model's one owner), prefix_cache (state snapshots by token prefix), tools (Kimi tool-call parsing),
constrain (llguidance grammars), errors (error objects), web (the chat page at /; its files in static/).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeOptions:
    """`kimi-mlx serve` flags with their defaults, in one place."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queue: int = 64
    prefix_cache_bytes: int = 4 << 30
    snapshot_interval: int = 2048
    prefill_step_size: int = 0  # 0: auto (feed.step_length)
    max_body_bytes: int = 64 << 20
    allowed_origins: tuple[str, ...] = ()
    log_level: str = "info"
    distributed: bool = False  # split over the ranks of mlx.launch; ranks > 0 serve rank 0's model calls
    max_tokens: int | None = None  # reply cap for requests without max_tokens (None: the context limit)
    served_model_names: tuple[str, ...] = ()  # ids /v1/models lists (first: the id replies report)
    strict_model_name: bool = False  # a request naming another model gets a 404
    web: bool = True  # the chat page at / (--no-web: off)
    draft: str | None = None  # speculative decoding for every request that does not turn it off
    num_draft: int = 0
    ngram: int = 3
    experts_memory_gb: float | None = None  # stream the routed experts into this much memory (docs/offload.md)
    max_batch: int = 8  # rows decoded together (continuous batching; a request with n choices takes n)
    batch_memory: int | None = None  # bytes the rows' states may reserve (None: auto, see worker.auto_batch_memory)


def build_app(model: str, opts: ServeOptions):
    """Load `model` (directory, hub repo id or 'demo') and make its app (the engine starts with the app)."""
    from pathlib import Path

    from ..loading import load
    from .app import ServerSettings, create_app
    from .worker import Engine, EngineSettings

    m, tok = load(model, distributed=opts.distributed, experts_memory_gb=opts.experts_memory_gb)
    engine = Engine(m, tok, EngineSettings(opts.max_queue, opts.prefix_cache_bytes, opts.snapshot_interval,
                                           opts.prefill_step_size, opts.max_tokens, opts.max_batch,
                                           opts.batch_memory, opts.draft, opts.num_draft, opts.ngram))
    if opts.draft:  # load a draft model now (a wrong path or vocabulary is an error at start, not per request)
        from ..generate import GenerationOptions
        from ..speculate import make_draft

        make_draft(m, tok, GenerationOptions.from_kwargs(draft=opts.draft, num_draft=opts.num_draft, ngram=opts.ngram))
    model_id = model if model.count("/") == 1 and not Path(model).exists() else Path(model).name or model
    names = list(dict.fromkeys(opts.served_model_names)) or [model_id]
    settings = ServerSettings(names[0], names[1:], opts.api_key, list(opts.allowed_origins), opts.max_body_bytes,
                              opts.strict_model_name, {model} - set(names),
                              web=opts.web)
    return create_app(engine, settings)


def serve(model: str, opts: ServeOptions) -> None:
    import uvicorn

    from ..distributed import launch_rank

    # rank 0 serves; under --distributed the other ranks never return from build_app's load
    sock = listen_socket(opts.host, opts.port) if launch_rank() == 0 else None
    try:
        app = build_app(model, opts)
        config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level=opts.log_level,
                                timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        if sock is not None:
            sock.close()


def listen_socket(host: str, port: int):
    """The server's socket, bound before the model loads: a port in use is said at once, not after a load of
    minutes, and no other process can take the port meanwhile (uvicorn listens on this socket)."""
    import errno
    import socket

    from ..errors import KimiError

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a just-closed server's port rebinds
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise KimiError(f"port {port} on {host} is in use (another server?); stop it or pick a free one "
                            "with --port") from None
        raise KimiError(f"cannot listen on {host}:{port} ({e.strerror or e}); check --host and --port") from None
    sock.set_inheritable(True)
    return sock


def parse_bytes(text: str, flag: str) -> int:
    """'4GiB', '512MiB', '2GB', '1000' -> bytes."""
    from ..errors import KimiError

    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abgikm")
    try:
        value = float(num) * units[s[len(num):]]
    except (ValueError, KeyError):
        raise KimiError(f"{flag} {text!r}: expected a size such as 4GiB, 512MiB or 1000000") from None
    if value < 0:
        raise KimiError(f"{flag} {text!r}: must not be negative")
    return int(value)


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)
