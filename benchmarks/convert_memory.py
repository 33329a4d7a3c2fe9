"""Peak memory of `kimi-mlx convert` on a generated multi-GB HF checkpoint: streaming means peak RSS is
a small constant plus the largest group (one MoE layer with its experts), whatever the model size.

The checkpoint has the real Kimi Linear widths (hidden 2304, KDA 32x128, MLA 32 heads, 1024-wide experts,
163,840-token vocabulary) but few layers, random bf16 weights, one shard per layer like the release. It is
written under a temporary directory and deleted afterwards.

  python benchmarks/convert_memory.py --experts 128 --layers kkkm --record
  python benchmarks/convert_memory.py --tiny --experts 8 --layers km        (test widths: a smoke run, seconds)
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CASES = [("bf16, no quantization", []), ("4-bit kimi recipe, no report", ["--bits", "4", "--no-report"]),
         ("4-bit kimi recipe + quality report", ["--bits", "4"])]


REAL = dict(vocab_size=163840, hidden_size=2304, intermediate_size=9216, num_attention_heads=32, kv_lora_rank=512,
            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, moe_intermediate_size=1024, kda_heads=32,
            kda_dim=128)
TINY = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_attention_heads=4, kv_lora_rank=64,
            qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, moe_intermediate_size=128, kda_heads=4, kda_dim=64)


def make_config(layers: str, experts: int, tiny: bool = False) -> dict:
    from kimi_mlx.demo import DEMO_CONFIG

    w = dict(TINY if tiny else REAL)
    kda_heads, kda_dim = w.pop("kda_heads"), w.pop("kda_dim")
    cfg = dict(DEMO_CONFIG)
    cfg.update(w, num_hidden_layers=len(layers), num_key_value_heads=w["num_attention_heads"], num_experts=experts,
               num_experts_per_token=min(8, experts), torch_dtype="bfloat16")
    cfg["linear_attn_config"] = {"kda_layers": [i + 1 for i, c in enumerate(layers) if c == "k"],
                                 "full_attn_layers": [i + 1 for i, c in enumerate(layers) if c == "m"],
                                 "num_heads": kda_heads, "head_dim": kda_dim, "short_conv_kernel_size": 4}
    cfg.pop("kimi_mlx_note")
    return cfg


def write_checkpoint(path: Path, cfg: dict) -> tuple[int, int]:
    """One bf16 shard per layer (plus embed, head); returns (total bytes, largest shard bytes)."""
    import mlx.core as mx
    import numpy as np

    from kimi_mlx.demo import layer_tensors, write_byte_tokenizer

    rng = np.random.default_rng(0)

    def normal(shape, std):
        return (mx.random.normal(shape) * std).astype(mx.bfloat16)

    def save(name, tensors):
        arrays = {k: v if isinstance(v, mx.array) else mx.array(v) for k, v in tensors.items()}
        arrays = {k: v.astype(mx.bfloat16) if k.endswith("weight") else v for k, v in arrays.items()}
        mx.save_safetensors(str(path / name), arrays, metadata={"format": "pt"})
        return sum(a.nbytes for a in arrays.values())

    V, D = cfg["vocab_size"], cfg["hidden_size"]
    sizes = [save("embed.safetensors", {"model.embed_tokens.weight": normal((V, D), 1.0)})]
    for i in range(cfg["num_hidden_layers"]):
        sizes.append(save(f"layer{i}.safetensors", layer_tensors(cfg, i, rng, normal)))
    sizes.append(save("head.safetensors", {"model.norm.weight": mx.ones((D,)), "lm_head.weight": normal((V, D), 0.02)}))
    write_byte_tokenizer(path)  # convert refuses a source it could not write a loadable model from
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    return sum(sizes), max(sizes)


def peak_rss(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in GB, wall seconds) of a child process, from its own rusage."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr.read()}")
    return usage.ru_maxrss * 1024 / 1e9, wall  # ru_maxrss is in KiB on Linux


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--layers", default="kkkm", help="one letter per layer: k = KDA, m = MLA")
    ap.add_argument("--tiny", action="store_true", help="the tests' widths instead of the real ones (a smoke run)")
    ap.add_argument("--record", action="store_true", help="append to benchmarks/RESULTS.md")
    ap.add_argument("--generate", help=argparse.SUPPRESS)  # internal: write the checkpoint into this directory
    a = ap.parse_args()
    if a.generate:  # in a child, so the measuring parent stays small (a child's peak RSS counts its fork)
        print(json.dumps(write_checkpoint(Path(a.generate), make_config(a.layers, a.experts, a.tiny))))
        return
    root = Path(tempfile.mkdtemp(prefix="kimi-convert-bench-"))
    lines = []

    def echo(s):
        print(s, flush=True)
        lines.append(s)

    try:
        src = root / "src"
        src.mkdir()
        t0 = time.perf_counter()
        gen = [sys.executable, __file__, "--generate", str(src), "--experts", str(a.experts), "--layers", a.layers,
               *(["--tiny"] if a.tiny else [])]
        cfg = make_config(a.layers, a.experts, a.tiny)
        total, largest = json.loads(subprocess.run(gen, capture_output=True, text=True, check=True).stdout)
        echo(f"source: layers {a.layers}, {a.experts} experts of {cfg['moe_intermediate_size']} x "
             f"{cfg['hidden_size']}, hidden {cfg['hidden_size']}, vocab {cfg['vocab_size']}, bf16: "
             f"{total / 1e9:.2f} GB, largest group (one MoE layer) {largest / 1e9:.2f} GB "
             f"(written in {time.perf_counter() - t0:.0f}s)")
        base, _ = peak_rss([sys.executable, "-c", "import kimi_mlx.weights.convert"])
        device = subprocess.run([sys.executable, "-c", "import mlx.core as mx; print(mx.default_device(), 'mlx', "
                                 "mx.__version__)"], capture_output=True, text=True).stdout.strip()
        echo(f"constant: the process after imports {base:.2f} GB")
        echo(f"{'case':<38} {'peak RSS':>9} {'- const':>8} {'/ group':>8} {'output':>8} {'time':>6}")
        for name, flags in CASES:
            out = root / "out"
            rss, wall = peak_rss([sys.executable, "-m", "kimi_mlx", "convert", str(src), str(out), *flags])
            size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
            echo(f"{name:<38} {rss:7.2f}GB {rss - base:6.2f}GB {(rss - base) / (largest / 1e9):7.2f}x "
                 f"{size / 1e9:6.2f}GB {wall:5.0f}s")
            shutil.rmtree(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if a.record:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        device = f"{platform.machine()} {os.cpu_count()} cores, {device}"
        head = f"\n### Converter peak memory — {datetime.date.today()} — commit {commit or '?'} — {device}\n\n```\n"
        with open(Path(__file__).parent / "RESULTS.md", "a") as f:
            f.write(head + "\n".join(lines) + "\n```\n")


if __name__ == "__main__":
    main()
