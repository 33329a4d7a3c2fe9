"""MODEL_CARD.md of the packaged demo: what it is, data sources and licences, seed, config, commands."""

from __future__ import annotations

import json
import math
from pathlib import Path

COMMANDS = """\
python tools/build_corpus.py --out .demo_build/corpus.jsonl
python tools/train_tokenizer.py --corpus .demo_build/corpus.jsonl --ranks 4096 --seed 0 \\
    --tokenizer-out .demo_build/tokenizer --tokens-out .demo_build/tokens.npz
# on the GPU machine (tokens.npz carried):
python3 tools/train_demo.py --tokens .demo_build/tokens.npz --out OUT --seq-len {seq_len} --batch {batch} \\
    --steps {steps} --seed {seed}        # the run itself used --time-budget 330, which chose --steps {steps}
python tools/package_demo.py --trained OUT --bits {bits} --dtype {dtype}"""


def write_card(out: Path, trained: Path, sources: Path, bits: int, dtype: str, info: dict) -> None:
    log = json.loads((trained / "train_log.json").read_text())
    cfg = json.loads((trained / "config.json").read_text())
    src = json.loads(sources.read_text())
    t, a = log["train"], log["arch"]
    last = log["evals"][-1]
    rows = "\n".join(f"| {s['name']} | {s['version']} | {s['licence']} | {s['files']} |" for s in src["sources"])
    c = src["counts"]
    text = f"""# kimi-mlx demo model

A {log['params'] / 1e6:.2f}M-parameter Kimi Linear trained from scratch on Python source, shipped inside
kimi-mlx as the built-in `demo` (`kimi-mlx chat --model demo`). It has the real architecture (KDA and
MLA layers 3:1, first layer dense, MoE with a shared expert and sigmoid top-{a['experts_per_token']} routing
over {a['experts']} experts), Kimi's tokenizer format and chat format, and it writes plausible-looking Python.
It does not write correct code: it is a test subject for the loading, quantization, state and chat paths,
whose bugs show as worse text. The random-weight model stays available as `demo-random`.

## Files

- `config.json`, `model-*.safetensors`, `model.safetensors.index.json`: converted with `kimi-mlx convert
  --bits {bits} --dtype {dtype}` ({info['nbytes'] / 1e6:.2f} MB) from the float32 HF checkpoint
  (transformers `KimiLinearForCausalLM`) that training produced.
- `tiktoken.model`: byte-level BPE, {cfg['vocab_size'] - 256} ranks (0..255 the single bytes, then merges in
  training order), trained on the training split with Kimi's pre-tokenisation regex.
- `tokenizer_config.json`: Kimi's 256 special ids directly above the ranks ([BOS] = {cfg['bos_token_id']},
  <|im_end|> = {cfg['eos_token_id']}, ...), named in added_tokens_decoder; Kimi's chat template.
- `heldout.json`: the held-out files (whole files, {src['rule']}) with their sha256.
- `heldout_sample.txt`: one held-out file (CPython {src['python']} `Lib/cmd.py`, PSF licence) for tests.

## Data

Python source available offline on the build machine, licences read from each package's metadata
(MIT, BSD or Apache only; the standard library under the PSF licence). Files the filters keep: parseable,
at most 300 kB, no line over 400 chars, under 1% non-ASCII; the standard library's test suite, encodings,
lib2to3, idlelib, tkinter and vendored directories are left out. Each file is one plain-code document;
each function with a docstring also becomes a chat pair (user turn = decorators, signature and docstring;
assistant turn = the body), three pairs to a conversation, rendered with the chat template. Documents
end with [EOS], are shuffled (seed {t['seed']}) and concatenated.

| source | version | licence | files |
|---|---|---|---|
{rows}

Training split: {c['train_code']} files, {c['train_chat']} conversations, {c['train_chars'] / 1e6:.1f}M chars.
Held out: {c['heldout_code']} files, {c['heldout_chat']} conversations, {c['heldout_chars'] / 1e3:.0f}k chars.

## Training

{log['device']}, torch {log['torch']}, transformers {log['transformers']} (pure torch: KDA through
transformers' chunked reference), bf16 autocast, seed {t['seed']}. AdamW (0.9, 0.95), peak lr {t['lr']},
{t['warmup']} warm-up steps then cosine to {t['min_lr_ratio']}x, weight decay {t['weight_decay']} on matrices,
gradient clip {t['grad_clip']}; router correction bias trained aux-loss-free (rate {t['bias_rate']}).
Random windows of {t['seq_len']} tokens, batch {log['final_batch']}: {log['chosen_steps']} steps,
{log['tokens_seen'] / 1e6:.1f}M tokens, {log['train_seconds']:.0f} s. Held-out loss at the end:
code {last['heldout_loss']:.3f} nats/token (perplexity {math.exp(last['heldout_loss']):.1f}), chat
{last['heldout_chat_loss']:.3f} ({math.exp(last['heldout_chat_loss']):.1f}), {t['seq_len']}-token windows.

Architecture (tools/train_demo.py `Arch`): {json.dumps(a)}

Exact transformers configuration:

```json
{json.dumps(cfg, indent=1)}
```

## Conversion quality

kimi-mlx vs torch on a fixed prompt: max |logit difference| {info['parity_packaged']:.3f} for this
{bits}-bit file. The converter's report:

```
{chr(10).join(info['report'])}
```

Held-out perplexity of the source, the bf16 conversion and every quantization: benchmarks/RESULTS.md
(`python benchmarks/perplexity.py`).

## Reproduce

```
{COMMANDS.format(seq_len=t['seq_len'], batch=log['final_batch'], steps=log['chosen_steps'], seed=t['seed'],
                 bits=bits, dtype=dtype)}
```

GPU training is not bit-reproducible; the corpus, tokenizer and token stream are.

## Licence

The training text is the CPython standard library (PSF-2.0) and the packages above (MIT, BSD, Apache-2.0),
all of which allow redistribution with attribution; this card is that attribution. The weights are
distributed with kimi-mlx under its MIT licence.
"""
    (out / "MODEL_CARD.md").write_text(text)
