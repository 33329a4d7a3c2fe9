"""Kimi tool-call parsing (whole and streamed in every split) and the llguidance grammars behind
tool_choice and response_format, driven by random draws under their masks."""

import json
import re

import mlx.core as mx
import numpy as np
import pytest

from kimi_mlx.loading import load
from kimi_mlx.server.constrain import JSON_OPTIONS, GrammarError, Grammars, ban_tokens
from kimi_mlx.server.tools import ToolCallParser, call_grammar, calls_from_messages, forced_prefix

CALLS = ("<|tool_calls_section_begin|>"
         "<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{\"city\": \"Paris\"}<|tool_call_end|>"
         "<|tool_call_begin|>functions.search:1<|tool_call_argument_begin|>{\"q\": \"a<b\"}<|tool_call_end|>"
         "<|tool_calls_section_end|>")
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"unit": {"enum": ["c", "f"]}, "days": {"type": "integer", "minimum": 1,
                                                                                "maximum": 9}},
        "required": ["unit", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "ping", "parameters": {
        "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}}},
]


def replay(parser, pieces):
    out = []
    for p in pieces:
        out += parser.feed(p)
    return out + parser.finish()


def collect(deltas):
    content, calls = "", {}
    for d in deltas:
        if d.index is None:
            content += d.content
            continue
        if d.call is not None:
            calls[d.index] = {"header": d.call.header, "name": d.call.name, "arguments": ""}
        calls[d.index]["arguments"] += d.arguments
    return content, [calls[i] for i in sorted(calls)]


def test_parser_splits_content_and_calls():
    p = ToolCallParser()
    content, calls = collect(replay(p, ["Let me check. " + CALLS]))
    assert content == "Let me check. " and p.content == content
    assert calls == [{"header": "functions.get_weather:0", "name": "get_weather", "arguments": '{"city": "Paris"}'},
                     {"header": "functions.search:1", "name": "search", "arguments": '{"q": "a<b"}'}]
    assert [c.to_openai()["function"]["name"] for c in p.calls] == ["get_weather", "search"]
    ids = [c.to_openai()["id"] for c in p.calls]  # plain and unique; the header stays with the call
    assert len(set(ids)) == 2 and all(re.fullmatch(r"call_[A-Za-z0-9]{24}", i) for i in ids)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 11])
def test_parser_streamed_in_any_split_gives_the_same_calls(size):
    text = "hi <" + CALLS + " done"
    whole = collect(replay(ToolCallParser(), [text]))
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    assert collect(replay(ToolCallParser(), pieces)) == whole
    assert whole[0] == "hi < done"


def test_parser_plain_text_and_dangling_marker_prefix():
    p = ToolCallParser()
    assert collect(replay(p, ["a <|tool", "_call"])) == ("a <|tool_call", [])
    assert p.calls == []


def test_header_without_functions_prefix_names_the_call():
    p = ToolCallParser()
    _, calls = collect(replay(p, ["<|tool_calls_section_begin|><|tool_call_begin|>lookup<|tool_call_argument_begin|>"
                                  "{}<|tool_call_end|><|tool_calls_section_end|>"]))
    assert calls == [{"header": "", "name": "lookup", "arguments": "{}"}]  # rendered back as functions.lookup:IDX
    assert p.calls[0].id.startswith("call_")


def test_calls_are_numbered_across_the_conversation():
    msgs = [{"role": "assistant", "tool_calls": [{}, {}]}, {"role": "tool"}, {"role": "assistant", "content": "x"}]
    assert calls_from_messages(msgs) == 2


@pytest.fixture(scope="module")
def grammars():
    model, tok = load("demo")
    return Grammars(tok, model.config.vocab_size), tok


def draw(grammars, grammar, seed, steps=400):
    """Random tokens allowed by the grammar's mask until the stop token; returns the text before it."""
    g, tok = grammars
    proc = g.processor(grammar)
    rng = np.random.default_rng(seed)
    tokens = [0]
    for _ in range(steps):
        logits = mx.array(rng.standard_normal((1, g.vocab_size)).astype(np.float32))
        masked = np.array(proc(mx.array(tokens), logits)[0])
        allowed = np.flatnonzero(np.isfinite(masked))
        assert len(allowed) > 0
        t = int(rng.choice(allowed))
        if t == tok.im_end_id:
            return tok.decode(tokens[1:])
        tokens.append(t)
    raise AssertionError("the grammar did not end")


@pytest.mark.parametrize("seed", range(4))
def test_named_tool_grammar_gives_a_valid_call(grammars, seed):
    g, _ = grammars
    grammar = g.lark(call_grammar(TOOLS, "get_weather", 3, JSON_OPTIONS))
    text = forced_prefix("get_weather", 3) + draw(grammars, grammar, seed)
    p = ToolCallParser()
    _, calls = collect(replay(p, [text]))
    assert [c["header"] for c in calls] == ["functions.get_weather:3"]
    args = json.loads(calls[0]["arguments"])
    assert args["unit"] in ("c", "f") and 1 <= args["days"] <= 9 and set(args) == {"unit", "days"}


@pytest.mark.parametrize("seed", range(4))
def test_required_tool_grammar_picks_one_of_the_tools(grammars, seed):
    g, _ = grammars
    grammar = g.lark(call_grammar(TOOLS, None, 0, JSON_OPTIONS))
    _, calls = collect(replay(ToolCallParser(), [forced_prefix(None, 0) + draw(grammars, grammar, seed)]))
    assert len(calls) == 1 and calls[0]["name"] in ("get_weather", "ping")
    json.loads(calls[0]["arguments"])


def test_json_schema_grammar_and_unsupported_schema(grammars):
    g, _ = grammars
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "tag": {"enum": ["x", "y"]}},
              "required": ["n", "tag"], "additionalProperties": False}
    out = json.loads(draw(grammars, g.json_schema(schema), 0))
    assert isinstance(out["n"], int) and out["tag"] in ("x", "y")
    with pytest.raises(GrammarError):
        g.json_schema({"type": "object", "not": {"type": "string"}})
    with pytest.raises(GrammarError):
        g.json_schema({"type": "wat"})


def test_ban_tokens_masks_only_those_ids():
    logits = mx.zeros((1, 8))
    out = np.array(ban_tokens([2, 5])(mx.array([0]), logits)[0])
    assert np.isneginf(out[[2, 5]]).all() and np.isfinite(np.delete(out, [2, 5])).all()


def test_strict_schemas_take_no_unlisted_properties(grammars):
    from kimi_mlx.server.tools import strict_schema

    g, tok = grammars
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"$ref": "#/$defs/B"}},
              "required": ["a", "b"], "$defs": {"B": {"type": "object", "properties": {"c": {"type": "boolean"}},
                                                      "required": ["c"]}}}
    strict = strict_schema(schema)
    assert strict["additionalProperties"] is False and strict["$defs"]["B"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # a copy
    extra = tok.encode('{"a": 1, "b": {"c": true}, "z": 2}')
    fits = tok.encode('{"a": 1, "b": {"c": true}}')

    def accepts(grammar, ids):
        from llguidance import LLMatcher

        return LLMatcher(g.ll_tokenizer(), grammar).validate_tokens(ids) == len(ids)

    assert accepts(g.json_schema(schema), extra)  # JSON Schema's default: more keys are allowed
    assert accepts(g.json_schema(strict), fits) and not accepts(g.json_schema(strict), extra)
    for seed in range(3):
        x = json.loads(draw(grammars, g.json_schema(strict), seed))
        assert set(x) == {"a", "b"} and set(x["b"]) == {"c"}
    # a strict tool's forced call likewise
    end = "<|tool_call_end|><|tool_calls_section_end|>"
    for flag, ok in ((None, True), (True, False)):
        tool = {"type": "function", "function": {"name": "f", "parameters": schema, "strict": flag}}
        grammar = g.lark(call_grammar([tool], "f", 0, JSON_OPTIONS))
        assert accepts(grammar, tok.encode('{"a": 1, "b": {"c": true}, "z": 2}' + end, allow_special=True)) == ok


def test_relaxable_keywords_are_dropped_with_a_warning(grammars):
    g, _ = grammars
    warnings = []
    schema = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"},
                                                        "uniqueItems": True}}, "required": ["tags"],
              "additionalProperties": False}
    out = json.loads(draw(grammars, g.json_schema(schema, warnings), 0))
    assert isinstance(out["tags"], list)
    assert warnings == ["not enforced: uniqueItems (unsupported by the grammar engine)"]
    with pytest.raises(GrammarError):
        g.json_schema({"type": "object", "not": {"type": "string"}}, [])
