"""Kimi's tiktoken BPE tokenizer, read from a checkpoint directory (no remote code)."""

from __future__ import annotations

import base64
import json
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

# Kimi's special tokens, as offsets from the first special id (163584 in the real vocabulary).
SPECIAL_OFFSETS = {
    "[BOS]": 0, "[EOS]": 1, "<|im_end|>": 2, "<|im_user|>": 3, "<|im_assistant|>": 4,
    "<|start_header_id|>": 6, "<|end_header_id|>": 7, "[EOT]": 9, "<|im_system|>": 10,
    "<|tool_calls_section_begin|>": 11, "<|tool_calls_section_end|>": 12, "<|tool_call_begin|>": 13,
    "<|tool_call_argument_begin|>": 14, "<|tool_call_end|>": 15, "<|im_middle|>": 17,
    "<|media_begin|>": 18, "<|media_content|>": 19, "<|media_end|>": 20, "<|media_pad|>": 21,
    "<think>": 22, "</think>": 23, "[UNK]": 254, "[PAD]": 255,
}


def read_ranks(path: Path) -> dict[bytes, int]:
    """Read a tiktoken rank file ('base64(token) rank' per line) ourselves: tiktoken's loader caches by path."""
    ranks = {}
    try:
        for n, line in enumerate(path.read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    except (ValueError, base64.binascii.Error):
        raise KimiError(f"{path}: line {n} is not 'base64-token rank'; the tokenizer file is corrupt") from None
    return ranks


def special_tokens(path: Path, n_ranks: int) -> dict[str, int]:
    """Names of the special block from tokenizer_config.json's added_tokens_decoder, else Kimi's defaults."""
    names = {i: f"<|reserved_token_{i}|>" for i in range(n_ranks, n_ranks + NUM_RESERVED_SPECIAL)}
    for name, off in SPECIAL_OFFSETS.items():
        names[n_ranks + off] = name
    cfg_file = path / "tokenizer_config.json"
    if cfg_file.exists():
        try:
            decoder = json.loads(cfg_file.read_text()).get("added_tokens_decoder", {})
        except json.JSONDecodeError:
            raise KimiError(f"{cfg_file}: not valid JSON; re-download the tokenizer files") from None
        for i, tok in decoder.items():
            if int(i) >= n_ranks:
                names[int(i)] = tok["content"] if isinstance(tok, dict) else str(tok)
    return {name: i for i, name in names.items()}


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        model_file = path / "tiktoken.model"
        if not model_file.exists():
            raise KimiError(f"{path}: tiktoken.model not found; the checkpoint has no Kimi tokenizer")
        ranks = read_ranks(model_file)
        self.special = special_tokens(path, len(ranks))
        self.id_to_special = {i: s for s, i in self.special.items()}
        self.encoding = tiktoken.Encoding(
            name=str(path), pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self.special
        )
        self.n_ranks = len(ranks)
        self.bos_id = self.special["[BOS]"]
        self.eos_id = self.special["[EOS]"]
        self.im_end_id = self.special["<|im_end|>"]

    @property
    def vocab_size(self) -> int:
        return self.n_ranks + len(self.special)

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if allow_special:
            return self.encoding.encode(text, allowed_special="all")
        return self.encoding.encode(text, allowed_special=set(), disallowed_special=())

    def decode_bytes(self, ids) -> bytes:
        return self.encoding.decode_bytes([int(i) for i in ids])

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")
