"""The terminal chat: a REPL over ChatSession, rich in a terminal, plain when stdin/stdout are pipes.

In a terminal: a coloured prompt, line editing, a progress bar while a long prompt is read, control
characters in replies shown as symbols. Piped: one reply per input line on stdout, notes and numbers
on stderr, no colours. Ctrl-C during a reply stops it (the partial reply is kept and closed); during
prompt reading it drops the message; at the prompt it only reminds how to quit.
"""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Iterator

from .errors import KimiError
from .generate import GenerationOptions, Response, stats_line
from .session import ChatSession
from .state import ContextUsage
from .words import count

HELP = """commands:
  /help              this list
  /system TEXT       set the system prompt and start over
  /reset             start over (keeps the system prompt)
  /undo              remove the last exchange
  /retry             drop the last reply and generate a new one
  /save FILE         save the conversation and its state
  /load FILE         continue a saved conversation
  /stats             context size, state memory, the last reply's numbers and settings (and, with
                     --experts-memory, the expert pool's hit rate, bytes read per token, time waiting on reads)
  /set NAME VALUE    change a setting: {names}
  /quit              exit (Ctrl-D too)
input: a line is one message; end a line with \\ to continue it, or put \"\"\" alone on a line to start
and end a multi-line message; start a message with // to send a text that begins with /."""

SETTABLE = [f.name for f in fields(GenerationOptions) if f.name not in ("logit_bias", "logprobs", "top_logprobs")]
ALIASES = {"temp": "temperature"}
# C0 controls (but tab and newline), DEL and C1 are shown as symbols in a terminal, never executed
_CONTROL = {c: chr(0x2400 + c) for c in range(32) if c not in (9, 10)} | {127: "\u2421"}
_CONTROL |= {c: "\ufffd" for c in range(0x80, 0xA0)}


class Interrupted(Exception):
    """Ctrl-C while the prompt was being read."""


class Output:
    """Where the chat writes: a rich terminal or plain pipes."""

    def __init__(self, tty: bool):
        self.tty = tty
        self._bar = None
        if tty:
            from rich.console import Console

            self.console = Console(highlight=False)

    def text(self, s: str) -> None:
        if self.tty:
            s = s.translate(_CONTROL)
        sys.stdout.write(s)
        sys.stdout.flush()

    def note(self, s: str) -> None:
        if self.tty:
            from rich.markup import escape

            self.console.print(f"[dim]{escape(s)}[/dim]")
        else:
            print(s, file=sys.stderr, flush=True)

    def error(self, s: str) -> None:
        if self.tty:
            from rich.markup import escape

            self.console.print(f"[bold red]error:[/bold red] {escape(s)}")
        else:
            print(f"error: {s}", file=sys.stderr, flush=True)

    def progress(self, done: int, total: int) -> None:
        # a bar only while more prompt chunks remain (the last token is fed with the first reply token)
        if not self.tty or (self._bar is None and total - done <= 1):
            return
        if self._bar is None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
            )

            self._bar = Progress(TextColumn("reading prompt"), BarColumn(), MofNCompleteColumn(),
                                 console=self.console, transient=True)
            self._task = self._bar.add_task("prompt", total=total)
            self._bar.start()
        self._bar.update(self._task, completed=done, total=total)
        if done >= total:
            self.end_progress()

    def end_progress(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


@dataclass
class Turn:
    """The numbers of the last reply, for /stats."""

    last: Response
    first_token: int
    first_logprob: float


class Chat:
    def __init__(self, session: ChatSession, out: Output, load_session: Callable[[str], ChatSession]):
        self.session, self.out, self.load_session = session, out, load_session
        self.turn: Turn | None = None
        self.commands = {"help": self.help, "system": self.system, "reset": self.reset, "undo": self.undo,
                         "retry": self.retry, "save": self.save, "load": self.load, "stats": self.stats,
                         "set": self.set, "quit": None, "exit": None}

    def run(self, messages: Iterator[str]) -> None:
        for text in messages:
            if text.startswith("/") and not text.startswith("//"):
                name, _, arg = text[1:].strip().partition(" ")
                if name not in self.commands:
                    self.out.error(f"unknown command /{name}; /help lists the commands")
                    continue
                if self.commands[name] is None:
                    return
                try:
                    self.commands[name](arg.strip())
                except KimiError as e:
                    self.out.error(str(e))
            elif text.strip():
                self.stream(lambda progress, text=text: self.session.send(text.removeprefix("/"), progress=progress))

    def stream(self, start: Callable) -> None:
        """Stream one reply; Ctrl-C stops it (the partial reply is kept) or drops a message being read."""
        stop = {"now": False}

        def on_sigint(signum, frame):
            stop["now"] = True

        def progress(done, total):
            if stop["now"]:
                raise Interrupted
            self.out.progress(done, total)

        previous = signal.signal(signal.SIGINT, on_sigint)
        responses = first = last = None
        try:
            responses = start(progress)
            for r in responses:
                self.out.end_progress()
                first = first or r
                last = r
                self.out.text(r.text)
                if stop["now"]:
                    break
        except Interrupted:
            self.out.end_progress()
            self.out.note("[interrupted while reading the prompt: message dropped]")
            return
        except KimiError as e:
            self.out.end_progress()
            self.out.error(str(e))
            return
        finally:
            if responses is not None:
                responses.close()
            signal.signal(signal.SIGINT, previous)
        self.out.text("\n")
        if last is not None:
            self.turn = Turn(last, first.token, first.logprobs[first.token].item())
            if stop["now"] and last.finish_reason is None:
                self.out.note("[interrupted: the partial reply is kept; /retry replaces it, /undo removes it]")
            self.out.note(f"[{stats_line(last)}]")

    # -- commands ------------------------------------------------------------------------------
    def help(self, arg: str) -> None:
        self.out.note(HELP.format(names=", ".join(SETTABLE)))

    def system(self, arg: str) -> None:
        self.session.reset(arg or None)
        self.out.note("[system prompt set; conversation cleared]" if arg else "[system prompt removed; conversation cleared]")

    def reset(self, arg: str) -> None:
        msgs = self.session.messages
        self.session.reset(msgs[0]["content"] if msgs and msgs[0]["role"] == "system" else None)
        self.out.note("[conversation cleared]")

    def undo(self, arg: str) -> None:
        self.session.undo()
        self.out.note("[removed the last exchange]")

    def retry(self, arg: str) -> None:
        self.stream(lambda progress: self.session.regenerate(progress=progress))

    def save(self, arg: str) -> None:
        if not arg:
            raise KimiError("usage: /save FILE")
        self.session.save(Path(arg).expanduser())
        self.out.note(f"[saved {count(len(self.session.tokens), 'token')} to {arg}]")

    def load(self, arg: str) -> None:
        if not arg:
            raise KimiError("usage: /load FILE")
        self.session = self.load_session(arg)
        self.out.note(f"[loaded {arg}: {count(len(self.session.messages), 'message')}, "
                      f"{count(len(self.session.tokens), 'token')}]")

    def stats(self, arg: str) -> None:
        s = self.session
        opts = ", ".join(f"{k}={getattr(s.options, k)}" for k in SETTABLE if k != "seed")
        used = ContextUsage(s.context_tokens, s.model.config.max_position_embeddings)
        lines = [f"context: {used}, {count(len(s.messages), 'message')}, state {s.state.nbytes / 1e6:.1f} MB",
                 f"settings: {opts}, seed={s.seed}"]
        if self.turn:
            lines.append(f"last reply: {stats_line(self.turn.last)}")
            lines.append(f"first token: id {self.turn.first_token}, logprob {self.turn.first_logprob:.6f}")
        if getattr(s.model, "offload", None) is not None:  # hit rate, bytes read and waits since the model loaded
            lines.append(s.model.offload.line())
        self.out.note("\n".join(lines))

    def set(self, arg: str) -> None:
        name, _, value = arg.partition(" ")
        name, value = ALIASES.get(name, name), value.strip()
        if name not in SETTABLE or not value:
            raise KimiError(f"usage: /set NAME VALUE with NAME one of {', '.join(SETTABLE)}")
        if name == "seed":
            self.session.seed = _parse(int, value, name)
        elif name == "stop":
            self.session.options = self.session.options.updated(stop=[] if value == "none" else [value])
        elif name == "draft":  # speculative decoding: ngram, a draft model's path, or none (loaded now)
            from .speculate import make_draft

            opts = self.session.options.updated(draft=None if value in ("none", "off") else value)
            if opts.draft:
                make_draft(self.session.model, self.session.tokenizer, opts)
            self.session.options = opts
        else:
            kind = type(getattr(GenerationOptions, name))
            self.session.options = self.session.options.updated(**{name: _parse(kind, value, name)})
        self.out.note(f"[{name} = {value}]")


def _parse(kind, value: str, name: str):
    try:
        return kind(value)
    except ValueError:
        raise KimiError(f"/set {name}: {value!r} is not a valid {kind.__name__}") from None


def read_messages(tty: bool, out: Output) -> Iterator[str]:
    """Messages from stdin: lines, \\-continued lines, or \"\"\" blocks; Ctrl-D ends."""
    if tty:
        import readline  # noqa: F401  (line editing and history for input())

    def lines():
        while True:
            try:
                yield input(">>> " if tty and not pending else ("... " if tty else ""))
            except EOFError:
                return
            except KeyboardInterrupt:
                out.text("\n")
                out.note("[Ctrl-D or /quit exits]")

    pending: list[str] = []
    block = False
    for line in lines():
        if line.strip() == '"""':
            block = not block
            if not block:
                yield "\n".join(pending)
                pending = []
            continue
        if block or line.endswith("\\"):
            pending.append(line[:-1] if not block else line)
            continue
        yield "\n".join([*pending, line])
        pending = []
    if pending:
        yield "\n".join(pending)


def run_chat(model_name: str, options: GenerationOptions, system: str | None, session_file: str | None,
             distributed: bool = False, experts_memory_gb: float | None = None) -> None:
    from .loading import load

    tty = sys.stdin.isatty() and sys.stdout.isatty()
    out = Output(tty)
    model, tokenizer = load(model_name, distributed=distributed,  # distributed: only rank 0 returns
                            experts_memory_gb=experts_memory_gb)
    if options.draft:  # a draft that cannot be used is an error now, not at the first reply
        from .speculate import make_draft

        make_draft(model, tokenizer, options)

    def load_session(path: str) -> ChatSession:
        return ChatSession.load(Path(path).expanduser(), model, tokenizer, **_overrides(options))

    if session_file:
        session = load_session(session_file)
    else:
        session = ChatSession(model, tokenizer, system=system, **options.__dict__)
    if model_name == "demo-random":
        out.note("[demo model: random weights, the text is gibberish]")
    if tty:
        out.note(f"kimi-mlx chat: {model_name}. /help lists commands; Ctrl-C stops a reply; Ctrl-D or /quit exits.")
    if session_file:
        out.note(f"[resumed {session_file}: {count(len(session.messages), 'message')}, "
                 f"{count(len(session.tokens), 'token')}]")
    Chat(session, out, load_session).run(read_messages(tty, out))


def _overrides(options: GenerationOptions) -> dict:
    """Flags given on the command line that differ from the defaults override a loaded session's settings."""
    default = GenerationOptions()
    return {k: v for k, v in options.__dict__.items() if v != getattr(default, k)}
