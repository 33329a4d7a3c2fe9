"""Package train_demo.py's output as the built-in `demo` model (kimi_mlx/demo_data).

    python tools/package_demo.py --trained .demo_build/trained

1. Loads the trained weights into transformers' KimiLinearForCausalLM (strict: every tensor must
   match) and writes the HF source checkpoint (float32, save_pretrained) with the demo tokenizer
   beside it (--hf); checks kimi-mlx's logits against torch's on it.
2. Converts it with `kimi-mlx convert` (--bits, --dtype) into --out, drops the converter's README
   in favour of MODEL_CARD.md, and writes heldout.json (the held-out files with their sha256) and
   heldout_sample.txt (one held-out file, for tests that need held-out text offline).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.model_card import write_card  # noqa: E402

TOKENIZER_FILES = ("tiktoken.model", "tokenizer_config.json")
SAMPLE_SOURCE = "stdlib/cmd.py"
PARITY_PROMPT = "def main(argv=None):\n    "


def load_trained(trained: Path):
    from safetensors.torch import load_file
    from transformers import KimiLinearConfig, KimiLinearForCausalLM

    kwargs = json.loads((trained / "config.json").read_text())
    model = KimiLinearForCausalLM(KimiLinearConfig(**kwargs)).float().eval()
    sd = {}
    for f in sorted(trained.glob("model-*.safetensors")):
        sd.update(load_file(str(f)))
    model.load_state_dict(sd, strict=True)
    return model


def export_hf(trained: Path, tokenizer: Path, hf: Path) -> None:
    model = load_trained(trained)
    if hf.exists():
        shutil.rmtree(hf)
    model.save_pretrained(str(hf))
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer / name, hf / name)


def parity(hf: Path, ckpt: Path, dtype=None) -> float:
    """Max |logit difference| between transformers (float32, on hf) and kimi-mlx (on ckpt)."""
    import mlx.core as mx
    from transformers import KimiLinearForCausalLM

    from kimi_mlx.tokenizer import Tokenizer
    from kimi_mlx.weights.load import load_model

    ids = Tokenizer(hf).encode(PARITY_PROMPT)
    ref = KimiLinearForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor([ids]), use_cache=False).logits.numpy()
    got = np.array(load_model(ckpt, dtype=dtype)(mx.array([ids])).astype(mx.float32))
    return float(np.abs(got - want).max())


def package(hf: Path, out: Path, sources: Path, bits: int, dtype: str) -> dict:
    from kimi_mlx.weights.convert import ConvertOptions, convert

    res = convert(str(hf), out, ConvertOptions(bits=bits, dtype=dtype, force=True), log=lambda s: None)
    (out / "README.md").unlink(missing_ok=True)
    summary = json.loads(sources.read_text())
    listing = {"rule": summary["rule"], "python": summary["python"], "files": summary["heldout_files"]}
    (out / "heldout.json").write_text(json.dumps(listing, indent=1) + "\n")
    root = next(Path(s["root"]) for s in summary["sources"] if s["name"] == "stdlib")
    shutil.copy(root / SAMPLE_SOURCE.split("/", 1)[1], out / "heldout_sample.txt")
    return {"nbytes": res.nbytes, "report": res.report.lines() if res.report else []}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trained", type=Path, default=Path(".demo_build/trained"))
    ap.add_argument("--tokenizer", type=Path, default=Path(".demo_build/tokenizer"))
    ap.add_argument("--sources", type=Path, default=Path(".demo_build/corpus.jsonl.sources.json"))
    ap.add_argument("--hf", type=Path, default=Path(".demo_build/hf"))
    ap.add_argument("--out", type=Path, default=Path("kimi_mlx/demo_data"))
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    export_hf(args.trained, args.tokenizer, args.hf)
    print(f"wrote {args.hf}; max |logit diff| torch vs kimi-mlx (f32): {parity(args.hf, args.hf):.2e}")
    info = package(args.hf, args.out, args.sources, args.bits, args.dtype)
    info["parity_packaged"] = parity(args.hf, args.out)
    write_card(args.out, args.trained, args.sources, args.bits, args.dtype, info)
    print(f"wrote {args.out}: {info['nbytes'] / 1e6:.2f} MB; max |logit diff| vs torch {info['parity_packaged']:.3f}")


if __name__ == "__main__":
    main()
