"""Train the demo's byte-level BPE (Kimi's pre-tokenisation regex) and tokenize the corpus with it.

Writes a Kimi-format tokenizer directory: `tiktoken.model` (ranks 0..255 are the single bytes, then
the merges in training order), `tokenizer_config.json` (Kimi's 256 special ids directly above the
ranks, named in added_tokens_decoder, and Kimi's chat template). Then encodes the corpus with the
project's own `kimi_mlx.tokenizer.Tokenizer` (the loading path users get): code documents as plain
text, chat documents through the chat template; each document ends with [EOS].

    python tools/train_tokenizer.py --corpus .demo_build/corpus.jsonl --ranks 4096 \
        --tokenizer-out .demo_build/tokenizer --tokens-out .demo_build/tokens.npz

tokens.npz: train (uint16, documents shuffled with --seed and concatenated), heldout_code and
heldout_chat (uint16, concatenated) with *_offsets (document starts) and heldout_code_names.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kimi_mlx.chat_template import BUILTIN_TEMPLATE  # noqa: E402
from kimi_mlx.tokenizer import NUM_RESERVED_SPECIAL, PAT_STR, SPECIAL_OFFSETS, Tokenizer  # noqa: E402


def byte_decoder() -> dict[str, int]:
    """Inverse of the byte-level alphabet (GPT-2's bytes_to_unicode) that HF tokenizers trains in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def documents(corpus: Path, split: str):
    for line in corpus.open():
        d = json.loads(line)
        if d["split"] == split:
            yield d


def training_texts(corpus: Path):
    for d in documents(corpus, "train"):
        if d["kind"] == "code":
            yield d["text"]
        else:
            for m in d["messages"]:
                yield m["content"]


def train_ranks(corpus: Path, n_ranks: int) -> dict[bytes, int]:
    """BPE ranks: the 256 single bytes, then one rank per merge, in the trainer's merge order."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=n_ranks, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(training_texts(corpus), trainer=trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    dec = byte_decoder()
    ranks = {bytes([b]): b for b in range(256)}
    for m in merges:
        a, b = m if isinstance(m, list) else m.split(" ")
        token = bytes(dec[c] for c in a + b)
        if token not in ranks:
            ranks[token] = len(ranks)
        if len(ranks) == n_ranks:
            break
    return ranks


def write_tokenizer(ranks: dict[bytes, int], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    (out / "tiktoken.model").write_text("\n".join(lines) + "\n")
    n = len(ranks)
    names = {n + i: f"<|reserved_token_{n + i}|>" for i in range(NUM_RESERVED_SPECIAL)}
    names.update({n + off: name for name, off in SPECIAL_OFFSETS.items()})
    cfg = {
        "added_tokens_decoder": {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for i, s in sorted(names.items())},
        "additional_special_tokens": ["<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|start_header_id|>",
                                      "<|end_header_id|>", "[EOT]", "<|im_system|>", "<|im_middle|>"],
        "bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]", "unk_token": "[UNK]",
        "chat_template": BUILTIN_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1048576,
        "tokenizer_class": "TikTokenTokenizer",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1, ensure_ascii=False) + "\n")


def encode_doc(tok: Tokenizer, d: dict) -> list[int]:
    if d["kind"] == "code":
        ids = tok.encode(d["text"])
    else:
        ids = list(tok.apply_chat_template(d["messages"], add_generation_prompt=False, tokenize=True))
    return ids + [tok.eos_id]


def concat(docs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.cumsum([0] + [len(d) for d in docs])[:-1]
    return np.concatenate([np.array(d, np.uint16) for d in docs]), offsets.astype(np.int64)


def encode_corpus(corpus: Path, tok_dir: Path, out: Path, seed: int) -> dict:
    tok = Tokenizer(tok_dir)
    assert tok.vocab_size <= 65536, "token ids are stored as uint16"
    train = [encode_doc(tok, d) for d in documents(corpus, "train")]
    random.Random(seed).shuffle(train)
    held = list(documents(corpus, "heldout"))
    code = [d for d in held if d["kind"] == "code"]
    chat = [d for d in held if d["kind"] == "chat"]
    train_ids, _ = concat(train)
    code_ids, code_off = concat([encode_doc(tok, d) for d in code])
    chat_ids, chat_off = concat([encode_doc(tok, d) for d in chat])
    np.savez_compressed(out, train=train_ids, heldout_code=code_ids, heldout_code_offsets=code_off,
                        heldout_code_names=np.array([d["source"] for d in code]),
                        heldout_chat=chat_ids, heldout_chat_offsets=chat_off)
    chars = sum(len(d["text"]) for d in code)
    return {"train_tokens": int(train_ids.size), "heldout_code_tokens": int(code_ids.size),
            "heldout_chat_tokens": int(chat_ids.size), "heldout_code_chars_per_token": chars / code_ids.size,
            "vocab_size": tok.vocab_size, "n_ranks": tok.n_ranks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=Path(".demo_build/corpus.jsonl"))
    ap.add_argument("--ranks", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-out", type=Path, default=Path(".demo_build/tokenizer"))
    ap.add_argument("--tokens-out", type=Path, default=Path(".demo_build/tokens.npz"))
    ap.add_argument("--skip-train", action="store_true", help="reuse the tokenizer in --tokenizer-out")
    args = ap.parse_args()
    if not args.skip_train:
        write_tokenizer(train_ranks(args.corpus, args.ranks), args.tokenizer_out)
    print(json.dumps(encode_corpus(args.corpus, args.tokenizer_out, args.tokens_out, args.seed)))


if __name__ == "__main__":
    main()
