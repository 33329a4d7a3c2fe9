"""ChatSession: a conversation whose model state is kept across turns.

Invariant: after every completed reply, `tokens` (exactly what the state has consumed) equals the chat
template's ids for `messages`, with each assistant reply's generated ids as its content and the turn
closed by the template (<|im_end|>), also when max_tokens or the user cut the reply.

Each turn feeds only the tokens the history does not already hold: the new template ids are compared
with `tokens`, the state is rewound to the latest mark inside the common prefix (marks sit at every
turn boundary and just before each generation prompt's last token), and the rest is fed. So undo,
regenerate and editing the last message cost no re-prefill. A reply cut by a stop string keeps every
generated id up to the one that completed it (the streamed text stops before the string). `save`/`load` write the state as
safetensors and the tokens, messages, options and model identity as JSON in the same file.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .chat_template import TokenIds
from .errors import KimiError
from .feed import Progress, prefill
from .generate import Generation, GenerationOptions, Response, stop_ids
from .sample import random_seed
from .state_io import StateMark, load_state, mark, rewind, save_state

SESSION_VERSION = 1
MAX_MARKS = 16  # boundaries kept besides the empty state; older ones are dropped (then re-prefilled)


@dataclass
class Message:
    role: str
    content: str
    ids: list[int] | None = None  # an assistant reply's generated ids (without the closing token)

    def for_template(self) -> dict:
        return {"role": self.role, "content": TokenIds(self.ids) if self.ids is not None else self.content}

    def to_json(self) -> dict:
        return {"role": self.role, "content": self.content, **({"ids": self.ids} if self.ids is not None else {})}


@dataclass
class Boundary:
    n_tokens: int
    mark: StateMark


class ChatSession:
    def __init__(self, model, tokenizer, system: str | None = None, tools: list | None = None, **options):
        self.model, self.tokenizer, self.tools = model, tokenizer, tools
        self.options = GenerationOptions.from_kwargs(**options)
        self.seed = self.options.seed if self.options.seed is not None else random_seed()
        self.reset(system)

    def reset(self, system: str | None = None) -> None:
        """Start over (with a new system prompt, if given)."""
        self._finish_active()
        self._messages = [Message("system", system)] if system else []
        self.state = self.model.new_state(1)
        self.tokens: list[int] = []
        self._marks = [Boundary(0, mark(self.state))]
        self._retries = 0
        self.last: Response | None = None

    @property
    def messages(self) -> list[dict]:
        return [{"role": m.role, "content": m.content} for m in self._messages]

    @property
    def context_tokens(self) -> int:
        """Tokens the conversation holds: its messages through the chat template. Right after undo the state
        still holds the undone exchange (the next turn rewinds only as far as it must), so this, not the
        state's offset, is the conversation's size."""
        return len(self._target(add_generation_prompt=False))

    # -- turns ---------------------------------------------------------------------------------
    def send(self, text: str, role: str = "user", progress: Progress | None = None, **options) -> Iterator[Response]:
        """Add a message (user, or tool for a tool result) and stream the reply.

        Like regenerate and edit_last, it checks its arguments at once but changes nothing until iterated.
        """
        self._finish_active()
        return self._start(self._messages + [Message(role, text)], progress, options, retry=False)

    def regenerate(self, progress: Progress | None = None, **options) -> Iterator[Response]:
        """Drop the last reply and stream a new one (a fresh draw when sampling)."""
        self._finish_active()
        if not self._messages or self._messages[-1].role != "assistant":
            raise KimiError("nothing to regenerate: the last message is not a reply")
        return self._start(self._messages[:-1], progress, options, retry=True)

    def edit_last(self, text: str, progress: Progress | None = None, **options) -> Iterator[Response]:
        """Replace the last user message (dropping its reply) and stream a new reply."""
        self._finish_active()
        msgs = self._messages[:-1] if self._messages and self._messages[-1].role == "assistant" else self._messages
        if not msgs or msgs[-1].role != "user":
            raise KimiError("nothing to edit: there is no user message")
        return self._start(msgs[:-1] + [Message("user", text)], progress, options, retry=False)

    def undo(self) -> None:
        """Remove the last exchange (reply and the message before it); the state follows on the next turn."""
        self._finish_active()
        if not self._messages or self._messages[-1].role == "system":
            raise KimiError("nothing to undo")
        if self._messages[-1].role == "assistant":
            self._messages.pop()
        if self._messages and self._messages[-1].role != "system":
            self._messages.pop()

    def _start(self, messages: list[Message], progress, options, retry: bool) -> Iterator[Response]:
        opts = self.options.updated(**options) if options else self.options
        gen = self._reply(messages, progress, opts, retry)
        self._active = gen
        return gen

    def _finish_active(self) -> None:
        active, self._active = getattr(self, "_active", None), None
        if active is not None:
            active.close()

    def _reply(self, messages: list[Message], progress, opts: GenerationOptions, retry: bool) -> Iterator[Response]:
        """Stream the reply to `messages` (which become the conversation) and close the turn."""
        before, self._messages = self._messages, list(messages)
        self._retries = self._retries + 1 if retry else 0
        try:
            target = self._target(add_generation_prompt=True)
            opts = opts.updated(seed=self._turn_seed(len(target)))
            t0 = time.perf_counter()
            fed = self._sync(target[:-1], progress, opts.prefill_step_size)
            self._add_mark()
            n_prompt = fed + 1
            scaled = (lambda d, t: progress(fed + d, fed + t)) if progress else None
            # reserve 2: the session feeds the reply's last token and the closing token after it
            gen = Generation(self.model, self.tokenizer, self.state, target[-1:], opts, self.tokens, scaled, reserve=2)
            t_first = None
            responses = iter(gen)
            for r in responses:
                t_first = t_first or time.perf_counter()
                r.prompt_tokens, r.prompt_tps = n_prompt, n_prompt / max(t_first - t0, 1e-9)
                self.last = r
                yield r
        except GeneratorExit:
            responses.close()  # the generation settles its state first (a speculative one rewinds its drafts)
            self._close_reply(gen)
            raise
        except BaseException:
            self._messages = before
            self._restore_consistent()
            raise
        else:
            self._close_reply(gen)

    def _close_reply(self, gen: Generation) -> None:
        """Record the reply (generated ids, stop token dropped) and close the turn in the state."""
        ids, last = list(gen.tokens), gen.last
        fed_ids = ids if last is not None and last.mark is not None else ids[:-1]
        content = ids
        if last is not None and last.token in stop_ids(self.model, self.tokenizer):
            content = ids[:-1]
            if last.mark is not None and last.token != self.tokenizer.im_end_id:
                rewind(self.state, last.mark)  # take the stop token back; the template closes the turn
                fed_ids = content
        self.tokens += gen.prompt + fed_ids
        self._messages.append(Message("assistant", self.tokenizer.decode(content), ids=content))
        self._sync(self._target(add_generation_prompt=False), None, self.options.prefill_step_size)
        self._add_mark()

    def _restore_consistent(self) -> None:
        """After an error mid-turn the state may be half-updated: go back to the last mark and resync."""
        rewind(self.state, self._marks[-1].mark)
        self.tokens = self.tokens[: self._marks[-1].n_tokens]
        self._sync(self._target(add_generation_prompt=False), None, self.options.prefill_step_size)

    # -- state bookkeeping -----------------------------------------------------------------------
    def _target(self, add_generation_prompt: bool) -> list[int]:
        return self.tokenizer.apply_chat_template([m.for_template() for m in self._messages], tokenize=True,
                                                  add_generation_prompt=add_generation_prompt, tools=self.tools)

    def _sync(self, target: list[int], progress, step_size: int) -> int:
        """Make the state hold exactly `target`; returns how many tokens were fed (progress counts one more:
        the generation prompt's last token, fed by the generation)."""
        lcp = next((i for i, (a, b) in enumerate(zip(self.tokens, target)) if a != b), min(len(self.tokens), len(target)))
        if lcp < len(self.tokens):
            while self._marks[-1].n_tokens > lcp:
                self._marks.pop()
            rewind(self.state, self._marks[-1].mark)
            self.tokens = self.tokens[: self._marks[-1].n_tokens]
        new = target[len(self.tokens) :]
        prefill(self.model, self.state, new, step_size, progress, total=len(new) + 1)
        self.tokens += new
        return len(new)

    def _add_mark(self) -> None:
        if self._marks[-1].n_tokens == len(self.tokens):
            self._marks.pop()
        self._marks.append(Boundary(len(self.tokens), mark(self.state)))
        if len(self._marks) > MAX_MARKS + 1:
            del self._marks[1]

    def _turn_seed(self, position: int) -> int:
        """Seed of one reply: the same history and retry count give the same draw (so undo + resend repeats)."""
        digest = hashlib.sha256(f"{self.seed}:{position}:{self._retries}".encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1

    # -- files -----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        self._finish_active()
        self._sync(self._target(add_generation_prompt=False), None, self.options.prefill_step_size)
        opts = dict(self.options.__dict__)
        session = {"version": SESSION_VERSION, "tokens": self.tokens, "tools": self.tools, "seed": self.seed,
                   "retries": self._retries, "options": opts, "messages": [m.to_json() for m in self._messages]}
        save_state(path, self.state, self.model, {"session": session})

    @classmethod
    def load(cls, path: str | Path, model, tokenizer, **options) -> "ChatSession":
        """A saved session for this model; options override the saved ones."""
        state, meta = load_state(path, model)
        try:
            s = meta["session"]
            if s["version"] != SESSION_VERSION:
                raise KimiError(f"{path}: session version {s['version']}, this kimi-mlx reads {SESSION_VERSION}")
            session = cls(model, tokenizer, tools=s["tools"], **{**s["options"], **options})
            session.seed, session._retries = int(s["seed"]), int(s["retries"])
            session._messages = [Message(m["role"], m["content"], m.get("ids")) for m in s["messages"]]
            tokens = [int(t) for t in s["tokens"]]
        except KimiError:
            raise
        except Exception:
            raise KimiError(f"{path}: session file is corrupt (bad session record)") from None
        if tokens != session._target(add_generation_prompt=False) or len(tokens) != state.offset:
            raise KimiError(f"{path}: the saved tokens do not match this tokenizer's chat template for the "
                            "saved messages; load it with the tokenizer it was saved with")
        session.state, session.tokens = state, tokens
        session._add_mark()
        return session
