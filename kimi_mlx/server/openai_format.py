"""OpenAI response objects: chat.completion(.chunk) and text_completion, logprobs, usage.

Logprobs spell the text: a token's entry is given out once the text sent so far covers all of its bytes
(a token that is held back, possibly the start of a stop string, waits with it). At the end, the tokens
that start inside the sent text are given out and the rest (the end token, a matched stop string) are
dropped, so no chunk carries entries alone."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from .tools import Delta, ToolCallParser
from .worker import Finished, Piece, Scored


def combined(dones: list[Finished]) -> Finished:
    """The usage of a turn's n choices as one Finished: the prompt (and its cached part) once, the
    completion tokens of every choice summed."""
    first = dones[0]
    return Finished(first.finish_reason, first.prompt_tokens, first.cached_tokens,
                    sum(d.completion_tokens for d in dones), first.prefill_seconds)


def usage(done: Finished) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}


def _token_entry(tokenizer, token: int, logprob: float) -> dict:
    raw = tokenizer.decode_bytes([token])
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}


@dataclass
class Output:
    """Accumulates one reply's events into OpenAI chat or completion objects (whole or as chunks)."""

    tokenizer: object
    model: str
    kind: str  # "chat" | "completion"
    parse_tools: bool = False
    prefix: str = ""  # completions with echo: the prompt text comes first
    legacy_functions: bool = False  # the request used `functions`: the reply is a function_call
    index: int = 0  # the choice this Output builds (of a request's n)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    text: str = ""
    logprobs: list = field(default_factory=list)  # chat: entries; completion: (token, logprob, top, offset)
    parser: ToolCallParser = field(default_factory=ToolCallParser)
    pending: list = field(default_factory=list)  # (token, logprob, top) whose bytes the sent text does not cover
    sent_bytes: int = 0  # bytes of generated text sent
    covered_bytes: int = 0  # bytes of the tokens whose entries were given out
    offset: int = 0  # completions: characters of generated text before the next entry's token

    @property
    def object_id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + self.id

    def add(self, piece: Piece) -> tuple[list[Delta], list]:
        """Record a piece; returns its deltas and its logprob entries (for a stream chunk)."""
        size = len(piece.text.encode())
        if piece.token is None:  # forced text (a forced call's start) has no entries: count it as covered
            self.covered_bytes += size
        elif piece.logprob is not None:
            self.pending.append((piece.token, piece.logprob, piece.top_logprobs))
        self.text += piece.text
        self.sent_bytes += size
        entries = self._release(final=False)
        if not self.parse_tools:
            return ([Delta(content=piece.text)] if piece.text else []), entries
        return self.parser.feed(piece.text), entries

    def scored(self, ev: Scored) -> None:
        """The prompt's own entries (completions with echo), ahead of the generated ones."""
        offset = 0
        for token, logprob, top in ev.entries:
            self.logprobs.append((token, logprob, top, offset))
            offset += len(self.tokenizer.decode_bytes([token]).decode("utf-8", errors="replace"))

    def _release(self, final: bool) -> list:
        """Entries of pending tokens now covered by sent text (final: those starting inside it)."""
        out = []
        while self.pending:
            token, logprob, top = self.pending[0]
            size = len(self.tokenizer.decode_bytes([token]))
            end = self.covered_bytes + (size if not final else min(size, 1))
            if end > self.sent_bytes:
                break
            self.pending.pop(0)
            out.append(self._logprob(token, logprob, top))
            self.covered_bytes += size
        if final:
            self.pending = []
        self.logprobs.extend(out)
        return out

    def flush(self) -> tuple[list[Delta], list]:
        """The held-back end of the reply: deltas, and the entries of the tokens that spell it."""
        return (self.parser.finish() if self.parse_tools else []), self._release(final=True)

    def finish_reason(self, done: Finished) -> str:
        if self.parser.calls and done.finish_reason == "stop":
            return "function_call" if self.legacy_functions else "tool_calls"
        return done.finish_reason

    def _logprob(self, token: int, logprob: float, top):
        tok = self.tokenizer
        if self.kind == "completion":
            offset = len(self.prefix) + self.offset
            self.offset += len(tok.decode_bytes([token]).decode("utf-8", errors="replace"))
            return token, logprob, top or [], offset
        entry = _token_entry(tok, token, logprob)
        entry["top_logprobs"] = [_token_entry(tok, t, lp) for t, lp in (top or [])]
        return entry

    # -- whole objects --------------------------------------------------------------------------
    def choice(self, index: int) -> "Output":
        """The Output of another choice of the same request (same id and creation time)."""
        return Output(self.tokenizer, self.model, self.kind, self.parse_tools, self.prefix, self.legacy_functions,
                      index, self.id, self.created)

    def final(self, done: Finished, want_logprobs: bool) -> dict:
        self.flush()
        if self.kind == "chat":
            calls = [c.to_openai() for c in self.parser.calls]
            content = self.parser.content if self.parse_tools else self.text
            message = {"role": "assistant", "content": content if content or not calls else None}
            if calls and self.legacy_functions:
                message["function_call"] = calls[0]["function"]
            elif calls:
                message["tool_calls"] = calls
            choice = {"index": self.index, "message": message, "finish_reason": self.finish_reason(done),
                      "logprobs": {"content": self.logprobs} if want_logprobs else None}
        else:
            choice = {"index": self.index, "text": self.prefix + self.text, "finish_reason": done.finish_reason,
                      "logprobs": self.completion_logprobs(self.logprobs) if want_logprobs else None}
        return {**self._head(), "choices": [choice], "usage": usage(done)}

    def completion_logprobs(self, items) -> dict:
        tokens = [self.tokenizer.decode_bytes([t]).decode("utf-8", errors="replace") for t, *_ in items]
        top = [None if alts is None else {self.tokenizer.decode([t]): lp for t, lp in alts} for _, _, alts, _ in items]
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _, _ in items], "top_logprobs": top,
                "text_offset": [offset for *_, offset in items]}

    # -- stream chunks --------------------------------------------------------------------------
    def _head(self) -> dict:
        obj = {"chat": "chat.completion", "completion": "text_completion"}[self.kind]
        return {"id": self.object_id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": "kimi-mlx"}

    def chunk(self, deltas: list[Delta] = (), entries: list = (), finish: str | None = None,
              role: bool = False) -> dict:
        head = self._head()
        if self.kind == "chat":
            delta: dict = {"role": "assistant", "content": ""} if role else {}
            for d in deltas:
                for key, value in d.to_openai().items():
                    if key == "content":
                        delta["content"] = delta.get("content", "") + value
                    elif self.legacy_functions:  # one call: its name, then its arguments in pieces
                        fn = delta.setdefault("function_call", {"arguments": ""})
                        fn.update({k: v for k, v in value[0]["function"].items() if k == "name"})
                        fn["arguments"] += value[0]["function"]["arguments"]
                    else:
                        delta.setdefault("tool_calls", []).extend(value)
            choice = {"index": self.index, "delta": delta, "finish_reason": finish,
                      "logprobs": {"content": list(entries)} if entries else None}
            return {**head, "object": "chat.completion.chunk", "choices": [choice]}
        text = "".join(d.content for d in deltas)
        choice = {"index": self.index, "text": text, "finish_reason": finish,
                  "logprobs": self.completion_logprobs(entries) if entries else None}
        return {**head, "choices": [choice]}

    def usage_chunk(self, done: Finished) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(), "object": obj, "choices": [], "usage": usage(done)}
