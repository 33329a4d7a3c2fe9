"""OpenAI response objects: chat.completion(.chunk) and text_completion, logprobs, usage."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from .tools import Delta, ToolCallParser
from .worker import Finished, Piece


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
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    text: str = ""
    logprobs: list = field(default_factory=list)  # chat: entries; completion: (token, logprob, top)
    parser: ToolCallParser = field(default_factory=ToolCallParser)

    @property
    def object_id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + self.id

    def add(self, piece: Piece) -> tuple[list[Delta], list]:
        """Record a piece; returns its deltas and its logprob entries (for a stream chunk)."""
        entries = []
        if piece.token is not None and piece.logprob is not None:
            entries.append(self._logprob(piece))
            self.logprobs.extend(entries)
        self.text += piece.text
        if not self.parse_tools:
            return ([Delta(content=piece.text)] if piece.text else []), entries
        return self.parser.feed(piece.text), entries

    def flush(self) -> list[Delta]:
        return self.parser.finish() if self.parse_tools else []

    def finish_reason(self, done: Finished) -> str:
        return "tool_calls" if self.parser.calls and done.finish_reason == "stop" else done.finish_reason

    def _logprob(self, piece: Piece):
        tok = self.tokenizer
        if self.kind == "completion":
            return piece.token, piece.logprob, piece.top_logprobs or [], len(self.prefix) + len(self.text)
        entry = _token_entry(tok, piece.token, piece.logprob)
        entry["top_logprobs"] = [_token_entry(tok, t, lp) for t, lp in (piece.top_logprobs or [])]
        return entry

    # -- whole objects --------------------------------------------------------------------------
    def final(self, done: Finished, want_logprobs: bool) -> dict:
        self.flush()
        if self.kind == "chat":
            calls = [c.to_openai() for c in self.parser.calls]
            content = self.parser.content if self.parse_tools else self.text
            message = {"role": "assistant", "content": content if content or not calls else None}
            if calls:
                message["tool_calls"] = calls
            choice = {"index": 0, "message": message, "finish_reason": self.finish_reason(done),
                      "logprobs": {"content": self.logprobs} if want_logprobs else None}
        else:
            choice = {"index": 0, "text": self.prefix + self.text, "finish_reason": done.finish_reason,
                      "logprobs": self._completion_logprobs(self.logprobs) if want_logprobs else None}
        return {**self._head(), "choices": [choice], "usage": usage(done)}

    def _completion_logprobs(self, items) -> dict:
        tokens = [self.tokenizer.decode_bytes([t]).decode("utf-8", errors="replace") for t, *_ in items]
        top = [{self.tokenizer.decode([t]): lp for t, lp in alts} for _, _, alts, _ in items]
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
                    else:
                        delta.setdefault("tool_calls", []).extend(value)
            choice = {"index": 0, "delta": delta, "finish_reason": finish,
                      "logprobs": {"content": list(entries)} if entries else None}
            return {**head, "object": "chat.completion.chunk", "choices": [choice]}
        text = "".join(d.content for d in deltas)
        choice = {"index": 0, "text": text, "finish_reason": finish,
                  "logprobs": self._completion_logprobs(entries) if entries else None}
        return {**head, "choices": [choice]}

    def usage_chunk(self, done: Finished) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(), "object": obj, "choices": [], "usage": usage(done)}
