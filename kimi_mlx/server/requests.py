"""Requests -> TurnSpec: the chat template, tools and tool_choice, response_format, options, limits.

Everything here runs before a request is queued, so a client's mistake is a 400 that names the field
and never reaches the model.
"""

from __future__ import annotations

from ..chat_template import TokenIds
from ..errors import KimiError
from ..generate import GenerationOptions
from .constrain import JSON_OPTIONS, GrammarError
from .errors import ApiError
from .schemas import ChatRequest, CompletionRequest, Sampling
from .tools import SECTION_BEGIN, call_grammar, calls_from_messages, forced_prefix
from .worker import TurnSpec


def options(engine, req: Sampling, max_tokens: int | None, n_input: int, **extra) -> GenerationOptions:
    """GenerationOptions for req (defaults from GenerationOptions), max_tokens fitted to the context."""
    if req.n != 1:
        raise ApiError(400, "n: only n = 1 is supported", param="n", code="unsupported_value")
    limit = engine.model.config.max_position_embeddings
    if n_input >= limit:
        raise ApiError(400, f"the input is {n_input} tokens; this model's context is {limit} tokens",
                       param="messages" if isinstance(req, ChatRequest) else "prompt", code="context_length_exceeded")
    if max_tokens is not None and n_input + max_tokens > limit:
        raise ApiError(400, f"{n_input} input tokens + max_tokens {max_tokens} exceed this model's context of "
                            f"{limit} tokens; lower max_tokens or shorten the input",
                       param="max_tokens", code="context_length_exceeded")
    kwargs = {**req.option_fields(), **extra}
    kwargs["max_tokens"] = max_tokens or min(GenerationOptions.max_tokens, limit - n_input)
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


def check_model(req: Sampling, names: set[str]) -> None:
    if req.model is not None and req.model not in names:
        raise ApiError(404, f"model {req.model!r} is not served here; GET /v1/models lists {min(names)!r}",
                       param="model", code="model_not_found")


def with_reply_ids(message: dict, replies) -> dict:
    """An assistant message this server generated is rendered from its generated ids (see ReplyIds)."""
    if message.get("role") == "assistant" and not message.get("tool_calls"):
        ids = replies.ids_for(message.get("content"))
        if ids is not None:
            return {**message, "content": TokenIds(ids)}
    return message


def chat_spec(engine, req: ChatRequest) -> TurnSpec:
    tok = engine.tokenizer
    messages = [with_reply_ids(m.for_template(), engine.replies) for m in req.messages]
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    try:
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, tools=tools)
    except KimiError as e:
        raise ApiError(400, f"messages: {e}", param="messages", code="invalid_value") from None
    forced, grammar, banned = [], None, []
    choice = req.tool_choice or ("auto" if tools else "none")
    if choice != "auto" and choice != "none":
        if not tools:
            raise ApiError(400, "tool_choice: a tool call was asked for but no tools were given",
                           param="tool_choice", code="invalid_value")
        if req.response_format and req.response_format.type != "text":
            raise ApiError(400, "response_format: cannot be combined with a forced tool call (tool_choice)",
                           param="response_format", code="invalid_value")
        name = None if choice == "required" else choice.function.name
        if name is not None and name not in {t["function"]["name"] for t in tools}:
            raise ApiError(400, f"tool_choice: no tool named {name!r} in tools", param="tool_choice",
                           code="invalid_value")
        index = calls_from_messages(messages)
        forced = tok.encode(forced_prefix(name, index), allow_special=True)
        grammar = _grammar(lambda: engine.grammars.lark(call_grammar(tools, name, index, JSON_OPTIONS)), "tools")
    elif choice == "none" and tools:
        banned = [tok.special[SECTION_BEGIN]]
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        grammar = _grammar(lambda: engine.grammars.json_schema({"type": "object"}), "response_format")
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise ApiError(400, "response_format.json_schema: required when type is json_schema",
                           param="response_format.json_schema", code="invalid_value")
        grammar = _grammar(lambda: engine.grammars.json_schema(fmt.json_schema.schema_), "response_format")
    top = req.top_logprobs or 0
    if top and not req.logprobs:
        raise ApiError(400, "top_logprobs: needs logprobs set to true", param="top_logprobs", code="invalid_value")
    max_tokens = req.max_completion_tokens or req.max_tokens
    opts = options(engine, req, max_tokens, len(prompt) + len(forced), logprobs=req.logprobs, top_logprobs=top)
    return TurnSpec(prompt, opts, forced, grammar, banned)


def completion_spec(engine, req: CompletionRequest) -> TurnSpec:
    tok, vocab = engine.tokenizer, engine.model.config.vocab_size
    if req.suffix:
        raise ApiError(400, "suffix: not supported", param="suffix", code="unsupported_value")
    if req.echo and req.logprobs:
        raise ApiError(400, "echo: not supported together with logprobs", param="echo", code="unsupported_value")
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        if not all(0 <= p < vocab for p in prompt):
            raise ApiError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt", code="invalid_value")
        ids = list(prompt)
    else:
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "prompt: give one prompt (a string, a list of one string, or token ids)",
                               param="prompt", code="unsupported_value")
            prompt = prompt[0]
        ids = tok.encode(prompt, allow_special=True)  # a raw prompt writes its own chat markup
    if not ids:
        raise ApiError(400, "prompt: empty; give at least one token", param="prompt", code="invalid_value")
    top = req.logprobs or 0
    opts = options(engine, req, req.max_tokens, len(ids), logprobs=req.logprobs is not None, top_logprobs=top)
    return TurnSpec(ids, opts)


def _grammar(build, param: str) -> str:
    try:
        return build()
    except GrammarError as e:
        raise ApiError(400, f"{param}: cannot be enforced ({e})", param=param, code="invalid_value") from None
