"""Chat templates: the checkpoint's jinja2 `chat_template` (HF semantics) or Kimi's built-in format.

Kimi K2-family format, no newlines between parts or turns:
  [<|im_system|>tool_declare<|im_middle|>{tools JSON}<|im_end|>]
  <|im_system|>system<|im_middle|>{content}<|im_end|>
  <|im_user|>user<|im_middle|>{content}<|im_end|>
  <|im_assistant|>assistant<|im_middle|>{content}[tool calls]<|im_end|>
  <|im_system|>tool<|im_middle|>{result}<|im_end|>
  generation prompt: <|im_assistant|>assistant<|im_middle|>

Before rendering, every special-token text inside the messages and tools (and any assistant content
given as token ids, `TokenIds`) is swapped for a marker made of Unicode noncharacters. The rendered
text is then split on the template's own special tokens (control ids) and the markers are swapped
back, so user text such as "<|im_end|>" is encoded as plain text, and generated ids go in verbatim.
(A template that inspects content for special-token text, e.g. to strip a <think> block, sees markers.)
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime

from .errors import KimiError

BUILTIN_TEMPLATE = (
    "{%- if tools -%}"
    "<|im_system|>tool_declare<|im_middle|>{{ tools | tojson(separators=(',', ':')) }}<|im_end|>"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set role = message['role'] -%}"
    "{%- if role == 'system' -%}<|im_system|>system<|im_middle|>"
    "{%- elif role == 'user' -%}<|im_user|>user<|im_middle|>"
    "{%- elif role == 'assistant' -%}<|im_assistant|>assistant<|im_middle|>"
    "{%- elif role == 'tool' -%}<|im_system|>tool<|im_middle|>"
    "{%- else -%}{{ raise_exception('unknown message role ' ~ role ~ '; use system, user, assistant or tool') }}"
    "{%- endif -%}"
    "{%- set content = message.get('content') -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- elif content -%}{%- for part in content -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if role == 'assistant' and message.get('tool_calls') -%}"
    "<|tool_calls_section_begin|>"
    "{%- for call in message['tool_calls'] -%}"
    "{%- set fn = call['function'] if call.get('function') else call -%}"
    "{%- set call_id = call.get('id') or '' -%}"
    "<|tool_call_begin|>"
    "{{ call_id if call_id.startswith('functions.') else 'functions.' ~ fn['name'] ~ ':' ~ loop.index0 }}"
    "<|tool_call_argument_begin|>"
    "{{ fn['arguments'] if fn['arguments'] is string else fn['arguments'] | tojson }}"
    "<|tool_call_end|>"
    "{%- endfor -%}"
    "<|tool_calls_section_end|>"
    "{%- endif -%}"
    "<|im_end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"
)

OPEN, CLOSE = "\ufdd0", "\ufdd1"  # noncharacters: never valid in interchanged text
MARKER = re.compile(f"{OPEN}(\\d+){CLOSE}")
SENTINELS = re.compile(f"[{OPEN}{CLOSE}]")


class TokenIds(list):
    """Message content given as token ids (a generated reply): inserted verbatim, never re-encoded."""


class TemplateRaised(Exception):
    pass


def _raise(msg):
    raise TemplateRaised(msg)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compile(source: str):
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise KimiError(f"the checkpoint's chat_template does not compile ({e}); fix or remove it") from None


def _sorted_keys(x):
    """Deep-sort dict keys (Kimi's tokenizer does this to tools so their JSON is stable)."""
    if isinstance(x, dict):
        return {k: _sorted_keys(x[k]) for k in sorted(x)}
    if isinstance(x, list):
        return [_sorted_keys(v) for v in x]
    return x


def _protect(obj, literals: list, pattern: re.Pattern):
    """Copy of obj with special-token text (and TokenIds) swapped for markers indexing `literals`."""

    def mark(lit) -> str:
        literals.append(lit)
        return f"{OPEN}{len(literals) - 1}{CLOSE}"

    if isinstance(obj, TokenIds):
        return mark(list(obj))
    if isinstance(obj, str):
        return pattern.sub(lambda m: mark(m.group(0)), obj)
    if isinstance(obj, dict):
        return {k: _protect(v, literals, pattern) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_protect(v, literals, pattern) for v in obj]
    return obj


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise KimiError("messages must be a list of {'role': ..., 'content': ...} dicts")


def _render(tokenizer, messages, tools, add_generation_prompt: bool, pattern: re.Pattern, **kwargs):
    """(rendered text with markers, literals)."""
    _check_messages(messages)
    literals: list = []
    msgs = _protect(list(messages), literals, pattern)
    tools = _protect(_sorted_keys(list(tools)), literals, pattern) if tools else None
    template = _compile(tokenizer.chat_template or BUILTIN_TEMPLATE)
    variables = {**tokenizer.template_tokens, **kwargs}
    try:
        text = template.render(messages=msgs, tools=tools, add_generation_prompt=add_generation_prompt, **variables)
    except TemplateRaised as e:
        raise KimiError(f"chat template: {e}") from None
    except Exception as e:  # jinja errors and whatever the template's own code raises
        raise KimiError(f"chat template failed on these messages ({type(e).__name__}: {e})") from None
    return text, literals


def render_chat(tokenizer, messages, tools=None, add_generation_prompt: bool = True, **kwargs) -> str:
    """The prompt text, as HF's apply_chat_template(tokenize=False) gives it."""
    text, literals = _render(tokenizer, messages, tools, add_generation_prompt, SENTINELS, **kwargs)

    def back(m):
        lit = literals[int(m.group(1))]
        return lit if isinstance(lit, str) else tokenizer.decode(lit)

    return MARKER.sub(back, text)


def encode_chat(tokenizer, messages, tools=None, add_generation_prompt: bool = True,
                allow_special: bool = False, **kwargs) -> list[int]:
    """Prompt token ids: the template's special tokens as control ids, message text as plain text."""
    pattern = SENTINELS if allow_special else re.compile(f"{SENTINELS.pattern}|{tokenizer.special_pattern.pattern}")
    text, literals = _render(tokenizer, messages, tools, add_generation_prompt, pattern, **kwargs)
    ids: list[int] = []
    pos = 0
    for m in tokenizer.special_pattern.finditer(text):
        ids.extend(_encode_segment(tokenizer, text[pos : m.start()], literals))
        ids.append(tokenizer.special[m.group(0)])
        pos = m.end()
    ids.extend(_encode_segment(tokenizer, text[pos:], literals))
    return ids


def _encode_segment(tokenizer, segment: str, literals: list) -> list[int]:
    """Plain text between control tokens; literal strings rejoin their context, TokenIds split it."""
    ids: list[int] = []
    buf = []
    parts = MARKER.split(segment)
    for j, part in enumerate(parts):
        lit = literals[int(part)] if j % 2 else part
        if isinstance(lit, str):
            buf.append(lit)
        else:
            ids.extend(tokenizer.encode("".join(buf)))
            ids.extend(lit)
            buf = []
    ids.extend(tokenizer.encode("".join(buf)))
    return ids
