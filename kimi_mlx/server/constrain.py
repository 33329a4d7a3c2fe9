"""Constrained decoding with llguidance: JSON output (json_object, json_schema) and forced tool calls.

A grammar becomes a logits processor that masks every token the grammar forbids at this step and
advances its matcher by each generated token; at the grammar's end only the stop token is allowed.
"""

from __future__ import annotations

import json
import re
import threading

import mlx.core as mx
import numpy as np

# compact JSON with the usual separators unless a schema's own "x-guidance" says otherwise
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


# Keywords llguidance does not implement that pydantic's model_json_schema writes for ordinary types
# (uniqueItems for set[...], discriminator for tagged unions, annotations). Each either only narrows the
# values a schema already allows or annotates it, so dropping it still yields values of the right shape:
# such a schema is enforced without it and the reply says so (a warning), rather than refused.
RELAXABLE = frozenset({"uniqueItems", "discriminator", "deprecated", "readOnly", "writeOnly", "examples",
                       "contentEncoding", "contentMediaType", "contentSchema", "$comment"})
_UNIMPLEMENTED = re.compile(r'Unimplemented keys: \[([^\]]*)\]')


class GrammarError(ValueError):
    """The grammar (a JSON schema or the tools' parameters) cannot be enforced."""


def unimplemented_keys(messages: list[str]) -> set[str]:
    keys: set[str] = set()
    for m in messages:
        for found in _UNIMPLEMENTED.findall(m):
            keys |= {k.strip().strip('"') for k in found.split(",") if k.strip()}
    return keys


def without_keys(obj, keys: set[str]):
    """A copy of a JSON schema (or a lark text's embedded schemas) with these keywords dropped everywhere
    except as property names."""
    if isinstance(obj, list):
        return [without_keys(v, keys) for v in obj]
    if not isinstance(obj, dict):
        return obj
    return {k: ({p: without_keys(s, keys) for p, s in v.items()} if k == "properties" and isinstance(v, dict)
                else without_keys(v, keys)) for k, v in obj.items() if k not in keys or k == "properties"}


class Grammars:
    """Builds and checks grammars against one tokenizer (its llguidance twin is made once, lazily)."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._ll = None
        self._lock = threading.Lock()

    def ll_tokenizer(self):
        with self._lock:
            if self._ll is None:
                from llguidance.tiktoken import lltokenizer_from_encoding

                self._ll = lltokenizer_from_encoding(self.tokenizer.encoding, n_vocab=self.vocab_size,
                                                     eos_token=self.tokenizer.im_end_id)
            return self._ll

    def json_schema(self, schema: dict, warnings: list[str] | None = None) -> str:
        from llguidance import LLMatcher

        return self._relaxed(lambda s: LLMatcher.grammar_from_json_schema(json.dumps(s), defaults=JSON_OPTIONS),
                             schema, warnings)

    def lark(self, text: str, warnings: list[str] | None = None, schemas: dict | None = None) -> str:
        """A lark grammar; `text` may be a function of the JSON schemas it embeds (`schemas`), so that
        RELAXABLE keywords can be dropped from them."""
        from llguidance import LLMatcher

        if schemas is None:
            return self._relaxed(lambda _: LLMatcher.grammar_from_lark(text), None, warnings)
        return self._relaxed(lambda s: LLMatcher.grammar_from_lark(text(s)), schemas, warnings)

    def _relaxed(self, build, schema, warnings: list[str] | None) -> str:
        """build(schema) checked; RELAXABLE keywords llguidance refuses are dropped (noted in `warnings`)."""
        dropped: set[str] = set()
        while True:
            try:
                try:
                    grammar = build(schema)
                except ValueError as e:
                    raise GrammarError(str(e)) from None
                return self.checked(grammar)
            except GrammarError as e:
                keys = unimplemented_keys([str(e)])
                if schema is None or not keys or not keys <= RELAXABLE or keys <= dropped:
                    raise
                dropped |= keys
                schema = without_keys(schema, dropped)
                if warnings is not None:
                    warnings.append(f"not enforced: {', '.join(sorted(keys))} (unsupported by the grammar engine)")

    def checked(self, grammar: str) -> str:
        from llguidance import LLMatcher

        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.ll_tokenizer())
        if is_error or messages:  # warnings name unsupported schema keywords: refuse rather than ignore
            raise GrammarError("; ".join(messages) or "invalid grammar")
        return grammar

    def processor(self, grammar: str) -> GrammarProcessor:
        from llguidance import LLMatcher

        return GrammarProcessor(LLMatcher(self.ll_tokenizer(), grammar), self.vocab_size,
                                self.tokenizer.im_end_id)


class GrammarProcessor:
    """(tokens, logits [1, V]) -> logits with forbidden ids at -inf. `tokens` is context + generated so far."""

    def __init__(self, matcher, vocab_size: int, stop_id: int):
        from llguidance.numpy import allocate_token_bitmask

        self.matcher, self.vocab_size, self.stop_id = matcher, vocab_size, stop_id
        self.mask = allocate_token_bitmask(1, vocab_size)
        self.seen: int | None = None

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        from llguidance.numpy import fill_next_token_bitmask

        n = tokens.size
        if self.seen is not None and n > self.seen:
            for t in tokens[self.seen :].tolist():
                self.matcher.consume_token(int(t))
        self.seen = n
        if self.matcher.is_error():
            allowed = np.zeros(self.vocab_size, bool)
            allowed[self.stop_id] = True
        else:
            fill_next_token_bitmask(self.matcher, self.mask)
            allowed = np.unpackbits(self.mask[0].view(np.uint8), bitorder="little")[: self.vocab_size].astype(bool)
        allowed = mx.array(allowed)
        if logits.shape[-1] > self.vocab_size:
            allowed = mx.concatenate([allowed, mx.zeros(logits.shape[-1] - self.vocab_size, mx.bool_)])
        return mx.where(allowed, logits, mx.array(-mx.inf, logits.dtype))


def ban_tokens(ids: list[int]):
    """A logits processor that never lets `ids` be drawn (tool_choice "none" bans the tool-call section)."""
    idx = mx.array(ids)

    def apply(tokens: mx.array, logits: mx.array) -> mx.array:
        return logits.at[:, idx].add(mx.array(-mx.inf, logits.dtype))

    return apply


def once(token: int):
    """A logits processor that lets `token` be drawn once in a reply (parallel_tool_calls false in auto mode:
    one <|tool_call_begin|>, so one call). `tokens` starts with context from before the reply, whose length
    the first call records, so calls in earlier turns do not count; each call reads only the new tokens."""
    seen = {"upto": None, "drawn": False}

    def apply(tokens: mx.array, logits: mx.array) -> mx.array:
        n = tokens.size
        if seen["upto"] is not None and not seen["drawn"] and n > seen["upto"]:
            seen["drawn"] = token in tokens[seen["upto"]:].tolist()
        seen["upto"] = n
        if seen["drawn"]:
            return logits.at[:, token].add(mx.array(-mx.inf, logits.dtype))
        return logits

    return apply
