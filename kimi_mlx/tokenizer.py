"""Kimi's tiktoken BPE tokenizer, read from a checkpoint directory (no remote code).

Encoding follows the upstream tokenizer: the text is cut into pieces of at most 400,000 chars and
at runs of more than 25,000 consecutive whitespace or non-whitespace chars, each piece encoded on
its own. Special-token text is plain text unless `allow_special=True` is asked for.
"""

from __future__ import annotations

import base64
import codecs
import json
import re
from pathlib import Path

import tiktoken

from .errors import KimiError

PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
NUM_RESERVED_SPECIAL = 256
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000

# Kimi's special tokens, as offsets from the first special id (163584 in the real vocabulary).
SPECIAL_OFFSETS = {
    "[BOS]": 0, "[EOS]": 1, "<|im_end|>": 2, "<|im_user|>": 3, "<|im_assistant|>": 4,
    "<|start_header_id|>": 6, "<|end_header_id|>": 7, "[EOT]": 9, "<|im_system|>": 10,
    "<|tool_calls_section_begin|>": 11, "<|tool_calls_section_end|>": 12, "<|tool_call_begin|>": 13,
    "<|tool_call_argument_begin|>": 14, "<|tool_call_end|>": 15, "<|im_middle|>": 17,
    "<|media_begin|>": 18, "<|media_content|>": 19, "<|media_end|>": 20, "<|media_pad|>": 21,
    "<think>": 22, "</think>": 23, "[UNK]": 254, "[PAD]": 255,
}
TEMPLATE_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def read_ranks(path: Path) -> dict[bytes, int]:
    """Read a tiktoken rank file ('base64(token) rank' per line) ourselves: tiktoken's loader caches by path."""
    ranks = {}
    n = 0
    try:
        for n, line in enumerate(path.read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    except (ValueError, base64.binascii.Error):
        raise KimiError(f"{path}: line {n} is not 'base64-token rank'; the tokenizer file is corrupt") from None
    return ranks


def read_tokenizer_config(path: Path) -> dict:
    cfg_file = path / "tokenizer_config.json"
    if not cfg_file.exists():
        return {}
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise KimiError(f"{cfg_file}: not valid JSON; re-download the tokenizer files") from None
    if not isinstance(cfg, dict):
        raise KimiError(f"{cfg_file}: expected a JSON object; re-download the tokenizer files")
    return cfg


def special_tokens(cfg: dict, n_ranks: int) -> dict[str, int]:
    """Names of the special block from added_tokens_decoder, else Kimi's defaults."""
    names = {i: f"<|reserved_token_{i}|>" for i in range(n_ranks, n_ranks + NUM_RESERVED_SPECIAL)}
    for name, off in SPECIAL_OFFSETS.items():
        names[n_ranks + off] = name
    for i, tok in cfg.get("added_tokens_decoder", {}).items():
        if int(i) >= n_ranks:
            names[int(i)] = tok["content"] if isinstance(tok, dict) else str(tok)
    return {name: i for i, name in names.items()}


def read_chat_template(path: Path, cfg: dict) -> str | None:
    """The checkpoint's chat template: chat_template.jinja, else tokenizer_config's chat_template."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.exists():
        return jinja_file.read_text()
    tpl = cfg.get("chat_template")
    if isinstance(tpl, list):  # HF's named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default")
    return tpl if isinstance(tpl, str) and tpl.strip() else None


def split_runs(text: str, limit: int = MAX_RUN_CHARS) -> list[str]:
    """Cut text so that no piece holds more than `limit` consecutive whitespace or non-whitespace chars."""
    cuts = []
    for m in re.finditer(r"\s{%d,}|\S{%d,}" % (limit + 1, limit + 1), text):
        cuts.extend(range(m.start() + limit, m.end(), limit))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


class StreamingDetokenizer:
    """Turns token ids into text as they come: never emits a broken UTF-8 sequence, never loses bytes.

    Incomplete multi-byte sequences are held until completed; bytes that can never form valid UTF-8
    become U+FFFD, exactly as in `tokenizer.decode` of the whole sequence.
    """

    def __init__(self, tokenizer: "Tokenizer", skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.tokens: list[int] = []
        self.text = ""

    def add(self, token: int) -> str:
        """New text made complete by this token (often '' mid-character)."""
        self.tokens.append(token)
        if self.skip_special and token >= self.tokenizer.n_ranks:
            return ""
        new = self._decoder.decode(self.tokenizer.decode_bytes([token]))
        self.text += new
        return new

    def finalize(self) -> str:
        """Flush the held tail (a dangling partial character becomes U+FFFD)."""
        new = self._decoder.decode(b"", final=True)
        self.text += new
        return new


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        model_file = path / "tiktoken.model"
        if not model_file.exists():
            raise KimiError(f"{path}: tiktoken.model not found; the checkpoint has no Kimi tokenizer")
        ranks = read_ranks(model_file)
        cfg = read_tokenizer_config(path)
        self.special = special_tokens(cfg, len(ranks))
        self.id_to_special = {i: s for s, i in self.special.items()}
        self.special_pattern = re.compile("|".join(re.escape(s) for s in sorted(self.special, key=len, reverse=True)))
        self.encoding = tiktoken.Encoding(
            name=str(path), pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self.special
        )
        self.n_ranks = len(ranks)
        self.bos_id = self.special["[BOS]"]
        self.eos_id = self.special["[EOS]"]
        self.im_end_id = self.special["<|im_end|>"]
        self.chat_template = read_chat_template(path, cfg)
        self.template_tokens = {k: _token_text(cfg.get(k)) for k in TEMPLATE_TOKEN_KEYS if cfg.get(k)}
        self.template_tokens.setdefault("bos_token", "[BOS]")
        self.template_tokens.setdefault("eos_token", "[EOS]")

    @property
    def vocab_size(self) -> int:
        return self.n_ranks + len(self.special)

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of text; special-token text becomes control tokens only with allow_special=True."""
        ids: list[int] = []
        for i in range(0, len(text), MAX_ENCODE_CHARS):
            for piece in split_runs(text[i : i + MAX_ENCODE_CHARS]):
                if allow_special:
                    ids.extend(self.encoding.encode(piece, allowed_special="all"))
                else:
                    ids.extend(self.encoding.encode_ordinary(piece))
        return ids

    def decode_bytes(self, ids) -> bytes:
        return self.encoding.decode_bytes([int(i) for i in ids])

    def decode(self, ids, skip_special: bool = False) -> str:
        if skip_special:
            ids = [i for i in ids if int(i) < self.n_ranks]
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def detokenizer(self, skip_special: bool = False) -> StreamingDetokenizer:
        return StreamingDetokenizer(self, skip_special)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False,
                            tools=None, allow_special: bool = False, **kwargs):
        """Render messages with the checkpoint's template (or Kimi's built-in format), HF semantics.

        Returns the prompt text, or its token ids with tokenize=True. Special-token text inside
        message content stays plain text unless allow_special=True.
        """
        from .chat_template import encode_chat, render_chat

        if tokenize:
            return encode_chat(self, messages, tools, add_generation_prompt, allow_special, **kwargs)
        return render_chat(self, messages, tools, add_generation_prompt, **kwargs)


def _token_text(tok) -> str:
    return tok.get("content", "") if isinstance(tok, dict) else str(tok)
