"""Request bodies of the OpenAI-style endpoints (pydantic). Unknown fields are ignored, as OpenAI's
clients send some this server has no use for; a field sent as null is taken as not given (the spec marks
optional fields nullable and clients send them so); wrong types and out-of-range values are 400s that
name the field."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_not_given(cls, data):
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class ContentPart(Body):
    """A message part: text is read; any other kind (image_url, input_audio, file, ...) is refused by the
    request layer with a message saying this model reads text only."""

    type: str
    text: str | None = None


class FunctionCall(Body):
    name: str
    arguments: str


class ToolCallIn(Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


TEXT_PARTS = ("text", "input_text", "output_text")


def non_text_part(content) -> str | None:
    """The type of the first part of `content` this text-only model cannot read, if any."""
    if isinstance(content, list):
        for p in content:
            if p.type not in TEXT_PARTS:
                return p.type
    return None


def part_text(content) -> str:
    return "".join(p.text or "" for p in content) if isinstance(content, list) else content or ""


class Message(Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCall | None = None  # legacy (functions API): the assistant's one call

    def for_template(self) -> dict:
        role = {"developer": "system", "function": "tool"}.get(self.role, self.role)
        out: dict[str, Any] = {"role": role, "content": part_text(self.content)}
        calls = [c.model_dump() for c in self.tool_calls or ()]
        if self.function_call is not None and not calls:
            calls = [{"id": None, "type": "function", "function": self.function_call.model_dump()}]
        if calls:
            out["tool_calls"] = calls
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


class FunctionDef(Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-.]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Body):
    name: str


class NamedToolChoice(Body):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaSpec(Body):
    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class StreamOptions(Body):
    include_usage: bool = False


class Sampling(Body):
    """Fields shared by /v1/chat/completions, /v1/completions and /v1/responses."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)  # 0 only for scoring a prompt (completions, echo)
    temperature: Temperature | None = None
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)  # 0: greedy
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, lt=1.0)
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, strict=True)  # choices (rows sharing one prefill); the request layer bounds it
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    speculative: bool | None = None  # speculative decoding: None follows `serve --draft`; true without it: ngram

    def option_fields(self) -> dict:
        """GenerationOptions keywords the request sets (the rest keep their defaults)."""
        names = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "seed")
        out = {k: getattr(self, k) for k in names if getattr(self, k) is not None}
        if out.get("top_p") == 0:  # nothing but the most likely token is inside a nucleus of mass 0
            out.pop("top_p")
            out["temperature"] = 0.0
        if self.stop is not None:
            out["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return out


class LegacyFunctionChoice(Body):
    name: str


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    functions: list[FunctionDef] | None = None  # legacy spelling of tools
    function_call: Literal["auto", "none"] | LegacyFunctionChoice | None = None  # legacy tool_choice


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None


# -- /v1/responses ------------------------------------------------------------------------------------


class ResponseTool(Body):
    type: str
    name: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-.]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseToolChoice(Body):
    type: str
    name: str | None = None


class TextFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextConfig(Body):
    format: TextFormat | None = None


class InputItem(Body):
    """One item of `input`: a message (type 'message' or none, with role and content), a function_call
    the model made, a function_call_output, or a reasoning item (skipped: this model writes none)."""

    type: str | None = None
    role: Literal["system", "developer", "user", "assistant"] | None = None
    content: str | list[ContentPart] | None = None
    id: str | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[ContentPart] | None = None


class ResponsesRequest(Sampling):
    input: str | list[InputItem] = ""
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[ResponseTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | ResponseToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    include: list[str] | None = None
