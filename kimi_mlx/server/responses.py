"""POST /v1/responses, GET and DELETE /v1/responses/{id}: OpenAI's Responses API over the same engine.

A request becomes a ChatTurn (requests.py): `instructions` as the system message, `input` items as
messages (function_call items as the assistant's tool calls, function_call_output items as tool results),
function tools and tool_choice, text.format as the output format. With `previous_response_id` the
messages are that response's conversation (its input and output, but not its instructions, as OpenAI
does) followed by the new input.

A stored response keeps that conversation with its own reply as the ids the model generated, so the
follow-up renders to the very tokens the engine's final state consumed; that state sits in the prefix
cache, which the follow-up's lookup restores, and only the new input is prefilled (cached_tokens says
how much was reused). A response lives as long as its state does: both are under the prefix cache's byte
budget, least recently used first out, and a response whose state was evicted is gone (404).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from ..chat_template import TokenIds
from .errors import ApiError
from .openai_format import Output
from .requests import TEXT_ONLY, ChatTurn, OutputFormat
from .schemas import ResponsesRequest, non_text_part, part_text
from .tools import Delta, ToolCallParser
from .worker import Finished, Piece

PARAMS = {"messages": "input", "tools": "tools", "tool_choice": "tool_choice", "format": "text.format",
          "max_tokens": "max_output_tokens"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class StoredResponse:
    body: dict  # the response object as returned
    history: list[dict]  # template messages after the instructions, this response's reply included
    calls: dict[str, str]  # call id -> the model's header, for every call in `history`
    state_tokens: list[int]  # what the stored state consumed


class ResponseStore:
    """Stored responses by id; each is kept while the prefix cache holds its final state."""

    def __init__(self, cache):
        self.cache = cache
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, rid: str, item: StoredResponse) -> None:
        with self._lock:
            self._items[rid] = item
            for old in [k for k, v in self._items.items() if not self.cache.has(v.state_tokens)]:
                del self._items[old]

    def get(self, rid: str) -> StoredResponse | None:
        with self._lock:
            item = self._items.get(rid)
            if item is not None and not self.cache.has(item.state_tokens):
                del self._items[rid]
                item = None
            if item is not None:
                self._items.move_to_end(rid)
        if item is not None:
            self.cache.touch(item.state_tokens)
        return item

    def delete(self, rid: str) -> bool:
        """Forget a stored response (its state stays in the prefix cache as any other snapshot)."""
        with self._lock:
            return self._items.pop(rid, None) is not None

    def __len__(self) -> int:
        return len(self._items)


def not_found(rid: str, store: ResponseStore) -> ApiError:
    why = ("this server keeps no responses (--prefix-cache-bytes 0)" if store.cache.max_bytes <= 0 else
           "it was not stored (store: false), or it expired (stored responses live within the server's "
           "--prefix-cache-bytes, least recently used first out)")
    return ApiError(404, f"response {rid!r} not found: {why}; send the whole conversation as input instead",
                    param="previous_response_id", code="response_not_found")


def input_messages(req: ResponsesRequest, calls: dict[str, str]) -> list[dict]:
    """`input` as template messages. function_call items join the assistant message before them;
    function_call_output items become tool messages whose ids map to the model's call headers."""
    if isinstance(req.input, str):
        if not req.input:
            raise ApiError(400, "input: empty; give a string or a list of input items", param="input",
                           code="invalid_value")
        return [{"role": "user", "content": req.input}]
    if not req.input:
        raise ApiError(400, "input: empty; give a string or a list of input items", param="input",
                       code="invalid_value")
    out: list[dict] = []
    for i, item in enumerate(req.input):
        kind = item.type or "message"
        where = f"input.{i}"
        if kind == "message":
            if item.role is None:
                raise ApiError(400, f"{where}.role: required (user, assistant, system or developer)",
                               param=f"{where}.role", code="invalid_value")
            bad = non_text_part(item.content)
            if bad is not None:
                raise ApiError(400, f"{where}.content: a {bad!r} part; {TEXT_ONLY}", param=f"{where}.content",
                               code="unsupported_content")
            role = "system" if item.role == "developer" else item.role
            out.append({"role": role, "content": part_text(item.content)})
        elif kind == "function_call":
            if not item.name or item.call_id is None:
                raise ApiError(400, f"{where}: a function_call item needs call_id, name and arguments",
                               param=where, code="invalid_value")
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments or "{}"}}
            if out and out[-1]["role"] == "assistant" and "n_calls" not in out[-1]:
                out[-1] = {**out[-1], "tool_calls": [*out[-1].get("tool_calls", []), call]}
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            if item.call_id is None:
                raise ApiError(400, f"{where}.call_id: required (the call_id of the function_call it answers)",
                               param=f"{where}.call_id", code="invalid_value")
            output = item.output if isinstance(item.output, str) or item.output is None else part_text(item.output)
            out.append({"role": "tool", "tool_call_id": calls.get(item.call_id, item.call_id),
                        "content": output or ""})
        elif kind == "reasoning":
            continue  # this model writes no reasoning items; a client may echo another model's back
        else:
            raise ApiError(400, f"{where}.type: {kind!r} items are not supported; send message, function_call "
                                "and function_call_output items", param=f"{where}.type", code="unsupported_value")
    return out


def responses_turn(req: ResponsesRequest, store: ResponseStore) -> tuple[ChatTurn, list[dict], dict[str, str]]:
    """(the turn, the conversation after the instructions without the reply, the call-id map so far)."""
    history, calls = [], {}
    if req.previous_response_id:
        prev = store.get(req.previous_response_id)
        if prev is None:
            raise not_found(req.previous_response_id, store)
        history, calls = list(prev.history), dict(prev.calls)
    history += input_messages(req, calls)
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + history
    tools = None
    if req.tools:
        tools = []
        for i, t in enumerate(req.tools):
            if t.type != "function" or not t.name:
                raise ApiError(400, f"tools.{i}: only function tools ({{'type': 'function', 'name': ...}}) run here, "
                                    f"not {t.type!r}", param=f"tools.{i}.type", code="unsupported_value")
            fn = {"name": t.name, "parameters": t.parameters or {"type": "object"}}
            if t.description:
                fn["description"] = t.description
            fn["strict"] = t.strict is not False  # the Responses API's default is strict
            tools.append({"type": "function", "function": fn})
    choice = req.tool_choice
    if choice is not None and not isinstance(choice, str):
        if choice.type != "function" or not choice.name:
            raise ApiError(400, "tool_choice: auto, none, required or {'type': 'function', 'name': ...}",
                           param="tool_choice", code="invalid_value")
        choice = choice.name
    fmt = req.text.format if req.text else None
    output = None if fmt is None else OutputFormat(fmt.type, fmt.schema_, bool(fmt.strict))
    top = req.top_logprobs or 0
    turn = ChatTurn(messages, tools, choice, req.parallel_tool_calls is not False, output, req,
                    req.max_output_tokens or req.max_tokens, wants_logprobs(req), top, params=PARAMS)
    return turn, history, calls


def wants_logprobs(req: ResponsesRequest) -> bool:
    """OpenAI returns output text logprobs when `include` names them; top_logprobs alone asks for them too."""
    return "message.output_text.logprobs" in (req.include or ()) or req.top_logprobs is not None


def request_echo(req: ResponsesRequest) -> dict:
    """The request's settings as a response object repeats them."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools or ()]
    for t in tools:
        t["strict"] = t.get("strict") is not False
    choice = req.tool_choice
    if choice is None or isinstance(choice, str):
        choice = choice or "auto"
    else:
        choice = choice.model_dump(exclude_none=True)
    fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format else \
        {"type": "text"}
    return {"instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "metadata": req.metadata or {}, "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id, "temperature": req.temperature, "top_p": req.top_p,
            "top_logprobs": req.top_logprobs,
            "tool_choice": choice,
            "tools": tools, "text": {"format": fmt}, "store": req.store, "truncation": "disabled",
            "user": req.user, "reasoning": None, "error": None}


@dataclass
class ResponseOutput:
    """Accumulates one reply's events into a response object, whole or as typed stream events."""

    model: str
    echo: dict
    parse_tools: bool
    logprobs: Output | None = None  # set when logprobs were asked for: their bookkeeping (see openai_format)
    id: str = field(default_factory=lambda: new_id("resp"))
    created: int = field(default_factory=lambda: int(time.time()))
    parser: ToolCallParser = field(default_factory=ToolCallParser)
    items: list[dict] = field(default_factory=list)  # output items, in order
    open_item: dict | None = None  # the item being written (message or function_call)
    seq: int = 0

    def response(self, status: str, done: Finished | None = None) -> dict:
        obj = {"id": self.id, "object": "response", "created_at": self.created, "status": status,
               "model": self.model, "output": self.items if done is not None else [],
               "incomplete_details": None, "usage": None, **self.echo}
        if done is not None:
            if status == "incomplete":
                obj["incomplete_details"] = {"reason": "max_output_tokens"}
            obj["usage"] = {"input_tokens": done.prompt_tokens,
                            "input_tokens_details": {"cached_tokens": done.cached_tokens},
                            "output_tokens": done.completion_tokens,
                            "output_tokens_details": {"reasoning_tokens": 0},
                            "total_tokens": done.prompt_tokens + done.completion_tokens}
        return obj

    def event(self, kind: str, **fields) -> dict:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **fields}

    def start(self) -> list[dict]:
        head = self.response("in_progress")
        return [self.event("response.created", response=head), self.event("response.in_progress", response=head)]

    def add(self, piece: Piece) -> list[dict]:
        deltas = self.parser.feed(piece.text) if self.parse_tools else (
            [Delta(content=piece.text)] if piece.text else [])
        entries = self.logprobs.add(piece)[1] if self.logprobs else []
        return self._with_logprobs(self._apply(deltas), entries)

    def _with_logprobs(self, events: list[dict], entries: list) -> list[dict]:
        """Entries go with this step's text delta and into the message's text part (a tool call's tokens
        have none, as OpenAI gives logprobs for output text only)."""
        deltas = [e for e in events if e["type"] == "response.output_text.delta"]
        if entries and deltas:
            deltas[-1]["logprobs"] = entries
            item = next(i for i in self.items if i["id"] == deltas[-1]["item_id"])
            item["content"][0]["logprobs"] += entries
        return events

    def _apply(self, deltas: list[Delta]) -> list[dict]:
        events: list[dict] = []
        for d in deltas:
            if d.index is None:
                if not d.content:
                    continue
                if self.open_item is None or self.open_item["type"] != "message":
                    events += self._close()
                    events += self._open({"type": "message", "id": new_id("msg"), "status": "in_progress",
                                          "role": "assistant", "content": []})
                    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                    self.open_item["content"].append(part)
                    events.append(self.event("response.content_part.added", item_id=self.open_item["id"],
                                             output_index=len(self.items) - 1, content_index=0,
                                             part={**part, "logprobs": []}))
                self.open_item["content"][0]["text"] += d.content
                events.append(self.event("response.output_text.delta", item_id=self.open_item["id"],
                                         output_index=len(self.items) - 1, content_index=0, delta=d.content,
                                         logprobs=[]))
            elif d.call is not None:
                events += self._close()
                events += self._open({"type": "function_call", "id": new_id("fc"), "call_id": d.call.id,
                                      "name": d.call.name, "arguments": "", "status": "in_progress"})
                events += self._arguments(d.arguments)
            else:
                events += self._arguments(d.arguments)
        return events

    def _arguments(self, text: str) -> list[dict]:
        if not text or self.open_item is None or self.open_item["type"] != "function_call":
            return []
        self.open_item["arguments"] += text
        return [self.event("response.function_call_arguments.delta", item_id=self.open_item["id"],
                           output_index=len(self.items) - 1, delta=text)]

    def _open(self, item: dict) -> list[dict]:
        self.items.append(item)
        self.open_item = item
        return [self.event("response.output_item.added", output_index=len(self.items) - 1, item={**item,
                           **({"content": []} if item["type"] == "message" else {})})]

    def _close(self) -> list[dict]:
        item, self.open_item = self.open_item, None
        if item is None:
            return []
        index = len(self.items) - 1
        item["status"] = "completed"
        events = []
        if item["type"] == "message":
            part = item["content"][0]
            events.append(self.event("response.output_text.done", item_id=item["id"], output_index=index,
                                     content_index=0, text=part["text"], logprobs=part["logprobs"]))
            events.append(self.event("response.content_part.done", item_id=item["id"], output_index=index,
                                     content_index=0, part=part))
        else:
            events.append(self.event("response.function_call_arguments.done", item_id=item["id"],
                                     output_index=index, name=item["name"], arguments=item["arguments"]))
        events.append(self.event("response.output_item.done", output_index=index, item=item))
        return events

    def finish(self, done: Finished) -> tuple[dict, list[dict]]:
        """(the whole response, the closing events)."""
        events = self._apply(self.parser.finish() if self.parse_tools else [])
        events = self._with_logprobs(events, self.logprobs.flush()[1] if self.logprobs else [])
        events += self._close()
        status = "incomplete" if done.finish_reason == "length" else "completed"
        body = self.response(status, done)
        events.append(self.event(f"response.{status}", response=body))
        return body, events

    def stored(self, history: list[dict], calls: dict[str, str], done: Finished, stop_ids: set[int]) -> StoredResponse:
        """This response for the store: its reply as generated ids (the closing stop token is the template's)."""
        ids = done.generated[:-1] if done.generated and done.generated[-1] in stop_ids else done.generated
        reply = {"role": "assistant", "content": TokenIds(ids), "n_calls": len(self.parser.calls)}
        calls = {**calls, **{c.id: c.header for c in self.parser.calls if c.header}}
        return StoredResponse({}, [*history, reply], calls, done.state_tokens)
