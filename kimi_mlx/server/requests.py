"""Requests -> TurnSpec: the chat template, tools and tool_choice, response_format, options, limits.

Everything here runs before a request is queued, so a client's mistake is a 400 that names the field
and never reaches the model. /v1/chat/completions and /v1/responses both come down to a `ChatTurn`
(template messages, tools, tool choice, output format, sampling) and share `turn_spec`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..chat_template import TokenIds
from ..errors import KimiError
from ..generate import GenerationOptions
from .constrain import JSON_OPTIONS, GrammarError
from .errors import ApiError
from .schemas import ChatRequest, CompletionRequest, Sampling, non_text_part
from .tools import CALL_BEGIN, SECTION_BEGIN, call_grammar, calls_from_messages, forced_prefix, strict_schema
from .worker import TurnSpec

TEXT_ONLY = "this model reads text only; send the content as text parts ({'type': 'text', 'text': ...})"


def options(engine, req: Sampling, max_tokens: int | None, n_input: int, param: str = "messages",
            max_param: str = "max_tokens", **extra) -> GenerationOptions:
    """GenerationOptions for req (defaults from GenerationOptions). A request without max_tokens may use the
    whole context (or the server's --max-tokens default, if set); Generation stops at the context limit."""
    most = engine.settings.max_batch
    if req.n < 1:
        raise ApiError(400, f"n: {req.n} choices; ask for 1 to {most}", param="n", code="invalid_value")
    if req.n > most:
        raise ApiError(400, f"n: {req.n} choices exceed this server's batch of {most} rows (--max-batch); ask for "
                            f"at most {most}", param="n", code="invalid_value")
    limit = engine.model.config.max_position_embeddings
    if n_input >= limit:
        raise ApiError(400, f"the input is {n_input} tokens; this model's context is {limit} tokens",
                       param=param, code="context_length_exceeded")
    if max_tokens is not None and n_input + max_tokens > limit:
        raise ApiError(400, f"{n_input} input tokens + {max_param} {max_tokens} exceed this model's context of "
                            f"{limit} tokens; lower {max_param} or shorten the input",
                       param=max_param, code="context_length_exceeded")
    kwargs = {**req.option_fields(), **extra}
    st = engine.settings
    if req.speculative is True or (req.speculative is None and st.draft):  # off unless the server or request asks
        kwargs.update(draft=st.draft or "ngram", num_draft=st.num_draft, ngram=st.ngram)
    default = engine.settings.max_tokens or limit
    kwargs["max_tokens"] = max_tokens or min(default, limit - n_input)
    if req.logit_bias:
        kwargs["logit_bias"] = logit_bias(req.logit_bias, engine.model.config.vocab_size)
    try:
        return GenerationOptions.from_kwargs(**kwargs)
    except KimiError as e:
        name = str(e).split()[0]
        raise ApiError(400, str(e), param=name if name in kwargs else None, code="invalid_value") from None


def logit_bias(bias: dict[str, float], vocab_size: int) -> dict[int, float]:
    out = {}
    for key, value in bias.items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab_size:
            raise ApiError(400, f"logit_bias: {key!r} is not a token id in [0, {vocab_size})",
                           param="logit_bias", code="invalid_value")
        out[int(key)] = value
    return out


def check_model(req: Sampling, names: list[str], strict: bool, accepted: set[str] = frozenset()) -> None:
    """Any name is this model unless the server runs with --strict-model-name."""
    if strict and req.model is not None and req.model not in names and req.model not in accepted:
        listed = ", ".join(repr(n) for n in names)
        raise ApiError(404, f"model {req.model!r} is not served here; GET /v1/models lists {listed}",
                       param="model", code="model_not_found")


def with_reply_ids(message: dict, replies) -> dict:
    """An assistant message this server generated is rendered from its generated ids (see ReplyIds); one
    with tool calls keeps their count (n_calls) for the calls' numbering."""
    if message.get("role") != "assistant":
        return message
    if message.get("tool_calls"):
        ids = replies.ids_for_calls(message)
        if ids is not None:
            return {"role": "assistant", "content": TokenIds(ids), "n_calls": len(message["tool_calls"])}
        return message
    ids = replies.ids_for(message.get("content"))
    return {**message, "content": TokenIds(ids)} if ids is not None else message


def with_kimi_call_ids(messages: list[dict], known) -> list[dict]:
    """Clients see plain call ids (call_...); the prompt names calls as the model writes them,
    functions.NAME:IDX with IDX counting calls across the conversation. A call id this server issued
    maps back to the header the model generated (so the rendered turn equals the cached state); any
    other id gets the header the model would have written at that place."""
    out, local, n = [], {}, 0
    for m in messages:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                cid, name = c.get("id") or "", c["function"]["name"]
                header = known.header_for(cid) or (cid if cid.startswith("functions.") else f"functions.{name}:{n}")
                if cid:
                    local[cid] = header
                calls.append({**c, "id": header})
                n += 1
            m = {**m, "tool_calls": calls}
        elif m.get("role") == "assistant":
            n += m.get("n_calls", 0)
        elif m.get("role") == "tool" and m.get("tool_call_id"):
            cid = m["tool_call_id"]
            m = {**m, "tool_call_id": local.get(cid) or known.header_for(cid) or cid}
        out.append(m)
    return out


@dataclass
class OutputFormat:
    type: str  # text | json_object | json_schema
    schema: dict | None = None
    strict: bool = False


@dataclass
class ChatTurn:
    """A chat-style request in the server's terms, from /v1/chat/completions or /v1/responses."""

    messages: list[dict]  # template messages (assistant replies may be TokenIds)
    tools: list[dict] | None  # chat-completions tool dicts
    tool_choice: str | None  # auto | none | required | a function name
    parallel_tool_calls: bool
    output: OutputFormat | None
    sampling: Sampling
    max_tokens: int | None
    logprobs: bool = False
    top_logprobs: int = 0
    params: dict = field(default_factory=dict)  # request field names for error messages


PARAMS = {"messages": "messages", "tools": "tools", "tool_choice": "tool_choice", "format": "response_format",
          "max_tokens": "max_tokens"}


def chat_turn(req: ChatRequest) -> ChatTurn:
    for i, m in enumerate(req.messages):
        kind = non_text_part(m.content)
        if kind is not None:
            raise ApiError(400, f"messages.{i}.content: a {kind!r} part; {TEXT_ONLY}", param=f"messages.{i}.content",
                           code="unsupported_content")
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    choice, parallel = req.tool_choice, req.parallel_tool_calls is not False
    if tools is None and req.functions:  # the legacy functions API: one call a reply, other field names
        tools = [{"type": "function", "function": f.model_dump(exclude_none=True)} for f in req.functions]
        parallel = False
        if choice is None and req.function_call is not None:
            choice = req.function_call if isinstance(req.function_call, str) else req.function_call.name
    if choice is not None and not isinstance(choice, str):
        choice = choice.function.name
    fmt = req.response_format
    output = None
    if fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise ApiError(400, "response_format.json_schema: required when type is json_schema",
                           param="response_format.json_schema", code="invalid_value")
        output = OutputFormat("json_schema", fmt.json_schema.schema_, bool(fmt.json_schema.strict))
    elif fmt is not None:
        output = OutputFormat(fmt.type)
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens == 0:
        raise ApiError(400, "max_tokens: must be at least 1 (0 only scores a prompt, on /v1/completions with echo)",
                       param="max_tokens", code="invalid_value")
    top = req.top_logprobs or 0
    if top and not req.logprobs:
        raise ApiError(400, "top_logprobs: needs logprobs set to true", param="top_logprobs", code="invalid_value")
    return ChatTurn([m.for_template() for m in req.messages], tools, choice, parallel, output, req, max_tokens,
                    req.logprobs, top, PARAMS)


def chat_spec(engine, req: ChatRequest) -> TurnSpec:
    return turn_spec(engine, chat_turn(req))


def turn_spec(engine, turn: ChatTurn) -> TurnSpec:
    tok, p = engine.tokenizer, turn.params
    messages = with_kimi_call_ids([with_reply_ids(m, engine.replies) for m in turn.messages], engine.call_ids)
    tools = turn.tools
    try:
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, tools=tools)
    except KimiError as e:
        raise ApiError(400, f"{p['messages']}: {e}", param=p["messages"], code="invalid_value") from None
    forced, grammar, banned, single, warnings = [], None, [], [], []
    choice = turn.tool_choice or ("auto" if tools else "none")
    if choice not in ("auto", "none"):
        if not tools:
            raise ApiError(400, f"{p['tool_choice']}: a tool call was asked for but no tools were given",
                           param=p["tool_choice"], code="invalid_value")
        if turn.output and turn.output.type != "text":
            raise ApiError(400, f"{p['format']}: cannot be combined with a forced tool call ({p['tool_choice']})",
                           param=p["format"], code="invalid_value")
        name = None if choice == "required" else choice
        if name is not None and name not in {t["function"]["name"] for t in tools}:
            raise ApiError(400, f"{p['tool_choice']}: no tool named {name!r} in {p['tools']}",
                           param=p["tool_choice"], code="invalid_value")
        index = calls_from_messages(messages)
        forced = tok.encode(forced_prefix(name, index), allow_special=True)
        text = lambda tl: call_grammar(tl, name, index, JSON_OPTIONS, parallel=turn.parallel_tool_calls)  # noqa: E731
        grammar = _grammar(lambda: engine.grammars.lark(text, warnings, schemas=tools), p["tools"])
    elif choice == "none" and tools:
        banned = [tok.special[SECTION_BEGIN]]
    elif tools and not turn.parallel_tool_calls:
        single = [tok.special[CALL_BEGIN]]
    fmt = turn.output
    if fmt is not None and fmt.type == "json_object":
        grammar = _grammar(lambda: engine.grammars.json_schema({"type": "object"}, warnings), p["format"])
    elif fmt is not None and fmt.type == "json_schema":
        schema = strict_schema(fmt.schema) if fmt.strict else fmt.schema
        grammar = _grammar(lambda: engine.grammars.json_schema(schema, warnings), p["format"])
    opts = options(engine, turn.sampling, turn.max_tokens, len(prompt) + len(forced), param=p["messages"],
                   max_param=p["max_tokens"], logprobs=turn.logprobs, top_logprobs=turn.top_logprobs)
    return TurnSpec(prompt, opts, forced, grammar, banned, once=single, warnings=warnings, n=turn.sampling.n)


def completion_spec(engine, req: CompletionRequest) -> TurnSpec:
    tok, vocab = engine.tokenizer, engine.model.config.vocab_size
    if req.suffix:
        raise ApiError(400, "suffix: this model has no fill-in-the-middle format; put the text before the gap in "
                            "prompt and leave suffix out", param="suffix", code="unsupported_value")
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        if len(prompt) != 1:
            raise ApiError(400, "prompt: give one prompt a request (a string, token ids, or a list of one of them)",
                           param="prompt", code="unsupported_value")
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        if not all(0 <= p < vocab for p in prompt):
            raise ApiError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt", code="invalid_value")
        ids = list(prompt)
    else:
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "prompt: give one prompt a request (a string, token ids, or a list of one of "
                                    "them)", param="prompt", code="unsupported_value")
            prompt = prompt[0]
        ids = tok.encode(prompt, allow_special=True)  # a raw prompt writes its own chat markup
    if not ids:
        raise ApiError(400, "prompt: empty; give at least one token", param="prompt", code="invalid_value")
    score = bool(req.echo and req.logprobs is not None)
    if req.max_tokens == 0 and not score:
        raise ApiError(400, "max_tokens: 0 generates nothing; it scores the prompt only with echo: true and "
                            "logprobs set", param="max_tokens", code="invalid_value")
    top = req.logprobs or 0
    opts = options(engine, req, req.max_tokens or (1 if req.max_tokens == 0 else None), len(ids), param="prompt",
                   logprobs=req.logprobs is not None, top_logprobs=top)
    return TurnSpec(ids, opts, score=score, generate=req.max_tokens != 0, n=req.n)


def _grammar(build, param: str) -> str:
    try:
        return build()
    except GrammarError as e:
        raise ApiError(400, f"{param}: cannot be enforced ({e})", param=param, code="invalid_value") from None
