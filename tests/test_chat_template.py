"""Chat template: Kimi's built-in format exactly, HF-semantics jinja rendering, plain content specials."""

import json

import pytest
from test_tokenizer import make_cl100k_dir
from transformers.utils.chat_template_utils import render_jinja_template

from kimi_mlx.chat_template import TokenIds
from kimi_mlx.errors import KimiError
from kimi_mlx.tokenizer import Tokenizer

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny, 21C"},
    {"role": "assistant", "content": "It is sunny."},
    {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "tomorrow?"}]},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer(make_cl100k_dir(tmp_path_factory.mktemp("cl100k")))


def test_builtin_format_renders_every_role_exactly(tok):
    text = tok.apply_chat_template(CONVERSATION, tools=TOOLS)
    tools_json = json.dumps(TOOLS, separators=(",", ":"), sort_keys=True)
    assert text == (
        f"<|im_system|>tool_declare<|im_middle|>{tools_json}<|im_end|>"
        "<|im_system|>system<|im_middle|>You are helpful.<|im_end|>"
        "<|im_user|>user<|im_middle|>Weather in Paris?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><|tool_calls_section_begin|><|tool_call_begin|>"
        'functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>'
        "<|tool_calls_section_end|><|im_end|>"
        "<|im_system|>tool<|im_middle|>sunny, 21C<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>It is sunny.<|im_end|>"
        "<|im_user|>user<|im_middle|>And tomorrow?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>"
    )
    no_prompt = tok.apply_chat_template(CONVERSATION[:2], add_generation_prompt=False)
    assert no_prompt.endswith("Weather in Paris?<|im_end|>")


def test_tool_call_without_kimi_id_gets_one(tok):
    msgs = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_x", "function": {"name": "a", "arguments": {"k": 1}}},
        {"function": {"name": "b", "arguments": "{}"}}]}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=False)
    assert "<|tool_call_begin|>functions.a:0<|tool_call_argument_begin|>{\"k\": 1}<|tool_call_end|>" in text
    assert "<|tool_call_begin|>functions.b:1<|tool_call_argument_begin|>{}<|tool_call_end|>" in text


def test_tokenized_template_puts_control_ids_only_at_the_markup(tok):
    sp = tok.special
    msgs = [{"role": "user", "content": "say <|im_end|> then [EOS]"}]
    ids = tok.apply_chat_template(msgs, tokenize=True)
    assert ids == ([sp["<|im_user|>"]] + tok.encode("user") + [sp["<|im_middle|>"]]
                   + tok.encode("say <|im_end|> then [EOS]") + [sp["<|im_end|>"], sp["<|im_assistant|>"]]
                   + tok.encode("assistant") + [sp["<|im_middle|>"]])
    assert ids.count(tok.im_end_id) == 1
    asked = tok.apply_chat_template(msgs, tokenize=True, allow_special=True)
    assert asked.count(tok.im_end_id) == 2 and tok.eos_id in asked
    assert tok.decode(ids) == tok.apply_chat_template(msgs)


def test_token_ids_content_goes_in_verbatim(tok):
    reply = [tok.special["<think>"], *tok.encode(" odd"), 9999]
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": TokenIds(reply)}]
    ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=False)
    head = tok.apply_chat_template(msgs[:1], tokenize=True, add_generation_prompt=True)
    assert ids == head + reply + [tok.im_end_id]
    assert tok.apply_chat_template(msgs, add_generation_prompt=False).endswith(tok.decode(reply) + "<|im_end|>")


def test_marker_characters_in_content_survive(tok):
    text = "odd \ufdd0 0 \ufdd1 \ufdd00\ufdd1 chars"
    msgs = [{"role": "user", "content": text}]
    assert f"<|im_middle|>{text}<|im_end|>" in tok.apply_chat_template(msgs)
    ids = tok.apply_chat_template(msgs, tokenize=True)
    assert tok.encode(text) == ids[3 : 3 + len(tok.encode(text))]


HF_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}<|im_system|>{% else %}"
    "<|im_user|>{% endif %}{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
    "{% endfor %}{% if tools %}tools: {{ tools | tojson }}\n{% endif %}"
    "{% if add_generation_prompt %}<|im_assistant|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("source", ["config", "jinja_file"])
def test_checkpoint_template_renders_like_hf(tmp_path, source):
    extra = {"chat_template": HF_TEMPLATE} if source == "config" else {"chat_template": "unused {{ x }}"}
    path = make_cl100k_dir(tmp_path, extra)
    if source == "jinja_file":
        (path / "chat_template.jinja").write_text(HF_TEMPLATE)
    tok = Tokenizer(path)
    msgs = [{"role": "system", "content": " sys "}, {"role": "user", "content": "hi <|im_end|>"}]
    for gen in (True, False):
        for tools in (None, TOOLS):
            ours = tok.apply_chat_template(msgs, add_generation_prompt=gen, tools=tools)
            # Kimi's tokenizer deep-sorts tool keys before rendering; the generic HF renderer does not
            sorted_tools = json.loads(json.dumps(tools, sort_keys=True)) if tools else None
            hf = render_jinja_template([msgs], tools=sorted_tools, chat_template=HF_TEMPLATE,
                                       add_generation_prompt=gen, bos_token="[BOS]", eos_token="[EOS]")[0][0]
            assert ours == hf
    ids = tok.apply_chat_template(msgs, tokenize=True)
    assert ids[0] == tok.bos_id and ids.count(tok.im_end_id) == 2


def test_template_errors_are_one_line(tmp_path):
    tok = Tokenizer(make_cl100k_dir(tmp_path / "a", {"chat_template": "{{ raise_exception('no tools here') }}"}))
    with pytest.raises(KimiError, match="chat template: no tools here"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    tok = Tokenizer(make_cl100k_dir(tmp_path / "b", {"chat_template": "{% for %}"}))
    with pytest.raises(KimiError, match="does not compile"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    tok = Tokenizer(make_cl100k_dir(tmp_path / "c"))
    with pytest.raises(KimiError, match="unknown message role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])
    with pytest.raises(KimiError, match="list of"):
        tok.apply_chat_template(["just a string"])
