"""Kimi tool calls <-> OpenAI tool_calls.

The model writes calls as
  <|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{json}
  <|tool_call_end|>...<|tool_calls_section_end|>
`ToolCallParser` reads generated text as it streams and splits it into content and calls, emitting
OpenAI-style deltas; a marker split across chunks is held back until it is complete. Clients get a
plain id unique to each call (call_ + 24 random characters); the model's own header `functions.NAME:IDX`
stays with the call, and the engine maps the id back to it when the conversation is resent, so the
prompt renders back to the same tokens.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field

_ID_CHARS = string.ascii_letters + string.digits
MAX_PARALLEL_CALLS = 16  # calls one forced section may hold (the grammar unrolls one rule per call)


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(24))

SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARG_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
MARKERS = (SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARG_BEGIN, CALL_END)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""
    header: str = ""  # as the model wrote it: functions.NAME:IDX

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Delta:
    """One piece of output: content text, or the start of call `index`, or more of its arguments."""

    content: str = ""
    index: int | None = None
    call: ToolCall | None = None  # set on a call's first delta
    arguments: str = ""

    def to_openai(self) -> dict:
        if self.index is None:
            return {"content": self.content}
        fn = {"arguments": self.arguments}
        entry = {"index": self.index, "function": fn}
        if self.call is not None:
            entry.update(id=self.call.id, type="function")
            fn["name"] = self.call.name
        return {"tool_calls": [entry]}


def parse_header(header: str, index: int) -> ToolCall:
    """`functions.NAME:IDX` -> a call of NAME with a fresh id; any other header is taken as the name."""
    header = header.strip()
    name = header.removeprefix("functions.").rsplit(":", 1)[0]
    return ToolCall(new_call_id(), name, header=header if header.startswith("functions.") else "")


@dataclass
class ToolCallParser:
    mode: str = "content"  # content | section | header | args
    pending: str = ""
    header: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    content: str = ""

    def feed(self, text: str) -> list[Delta]:
        self.pending += text
        out: list[Delta] = []
        while self.pending:
            hit = min(((self.pending.find(m), m) for m in MARKERS if m in self.pending), default=None)
            if hit is None:
                keep = _partial_marker_len(self.pending)
                self._text(self.pending[: len(self.pending) - keep], out)
                self.pending = self.pending[len(self.pending) - keep :]
                break
            pos, marker = hit
            self._text(self.pending[:pos], out)
            self.pending = self.pending[pos + len(marker) :]
            self._marker(marker, out)
        return out

    def finish(self) -> list[Delta]:
        """Flush held text (a dangling partial marker is plain text)."""
        out: list[Delta] = []
        self._text(self.pending, out)
        self.pending = ""
        return out

    def _text(self, text: str, out: list[Delta]) -> None:
        if not text:
            return
        if self.mode == "header":
            self.header += text
        elif self.mode == "args":
            self.calls[-1].arguments += text
            out.append(Delta(index=len(self.calls) - 1, arguments=text))
        elif self.mode == "content":
            self.content += text
            out.append(Delta(content=text))
        # text between calls inside a section is dropped, as the template never writes any

    def _marker(self, marker: str, out: list[Delta]) -> None:
        if marker == SECTION_BEGIN:
            self.mode = "section"
        elif marker == CALL_BEGIN and self.mode in ("section", "content"):
            self.mode, self.header = "header", ""
        elif marker == ARG_BEGIN and self.mode == "header":
            call = parse_header(self.header, len(self.calls))
            self.calls.append(call)
            self.mode = "args"
            out.append(Delta(index=len(self.calls) - 1, call=call))
        elif marker == CALL_END and self.mode in ("args", "header"):
            self.mode = "section"
        elif marker == SECTION_END:
            self.mode = "content"


def _partial_marker_len(text: str) -> int:
    """Length of the longest tail of text that starts some marker."""
    for k in range(min(len(text), max(map(len, MARKERS)) - 1), 0, -1):
        if any(m.startswith(text[-k:]) for m in MARKERS):
            return k
    return 0


def calls_from_messages(messages: list[dict]) -> int:
    """Number of tool calls already made in a conversation (Kimi numbers calls across it). A reply kept as
    its generated ids (/v1/responses history) carries its call count as `n_calls`."""
    return sum(len(m.get("tool_calls") or []) + m.get("n_calls", 0) for m in messages if m.get("role") == "assistant")


def function_parameters(tool: dict) -> dict:
    params = tool["function"].get("parameters")
    return params if isinstance(params, dict) and params else {"type": "object"}


def forced_prefix(name: str | None, index: int) -> str:
    """The fixed start of a forced call: up to the arguments for a named function, else up to its name."""
    head = SECTION_BEGIN + CALL_BEGIN + "functions."
    return head + f"{name}:{index}" + ARG_BEGIN if name else head


def call_grammar(tools: list[dict], name: str | None, index: int, json_options: dict,
                 parallel: bool = False) -> str:
    """Lark grammar (llguidance) for the rest of a forced section after forced_prefix(name, index): one call
    (of `name`, or of any tool when name is None), or with `parallel` up to MAX_PARALLEL_CALLS, each
    numbered on from `index` as the model numbers them. A function's arguments rule is written once and
    shared by every call position."""
    chosen = [t for t in tools if name is None or t["function"]["name"] == name]
    lines = []
    for i, t in enumerate(chosen):
        params = function_parameters(t)
        schema = {**(strict_schema(params) if t["function"].get("strict") else params)}
        schema.setdefault("x-guidance", json_options)
        lines.append(f"args{i}: %json {json.dumps(schema)}")

    def calls_at(k: int, with_header: bool) -> str:
        alts = []
        for i, t in enumerate(chosen):
            head = json.dumps(f"{t['function']['name']}:{index + k}") + f" {ARG_BEGIN} " if with_header else ""
            alts.append(f"{head}args{i} {CALL_END}")
        return "(" + " | ".join(alts) + ")"

    n = MAX_PARALLEL_CALLS if parallel else 1
    first = calls_at(0, with_header=name is None)
    lines.insert(0, f"start: {first} more1" if n > 1 else f"start: {first} {SECTION_END}")
    for k in range(1, n):  # more{k}: the section ends, or call k follows
        tail = f"more{k + 1}" if k + 1 < n else SECTION_END
        lines.append(f'more{k}: {SECTION_END} | {CALL_BEGIN} "functions." {calls_at(k, True)} {tail}')
    return "\n".join(lines)


def strict_schema(schema):
    """`strict: true` as OpenAI enforces it: every object schema that does not say otherwise takes no
    properties besides those it lists (additionalProperties: false). A copy; nested schemas too."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) if k != "properties" else {p: strict_schema(s) for p, s in v.items()}
           for k, v in schema.items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out
