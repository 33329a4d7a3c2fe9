"""Pipeline parallelism on this machine: prefill and decode tok/s and per-rank peak memory, 1 rank vs 2.

A random-weight HF-layout checkpoint (8 layers: 6 KDA, 2 MLA, MoE from layer 2, float32) is written to a
temporary directory. Each run is a fresh process per rank (two ranks through `mlx.launch --backend ring`
over loopback); rank 0 drives the runtime's generate_step (a prompt of PROMPT tokens prefilled in one step,
then DECODE greedy tokens) through the same DriverModel as `kimi-mlx chat/serve --distributed`, and every
rank writes its peak memory when it exits. Runs alternate (1, 2, 1, 2 ranks) so that other load on the
machine hits both alike; the best of all timed runs (REPEATS per run, after one warm-up) is shown.

  python benchmarks/distributed.py [--record]
  python benchmarks/distributed.py --prompt 16 --decode 2 --repeats 1 --runs 1,2      (a smoke run: seconds)
"""

from __future__ import annotations

import argparse
import atexit
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from results import Recorder  # noqa: E402

PROMPT, DECODE, REPEATS = 512, 32, 2
SHAPE = dict(
    model_type="kimi_linear", vocab_size=4096, hidden_size=512, num_hidden_layers=8, intermediate_size=1024,
    num_attention_heads=8, num_key_value_heads=8, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
    v_head_dim=64, q_lora_rank=None, mla_use_nope=True, num_experts=16, num_experts_per_token=4,
    num_shared_experts=1, moe_intermediate_size=256, first_k_dense_replace=1, moe_layer_freq=1,
    moe_renormalize=True, routed_scaling_factor=2.446, num_expert_group=1, topk_group=1, rms_norm_eps=1e-5,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0, model_max_length=1048576,
    linear_attn_config={"kda_layers": [1, 2, 3, 5, 6, 7], "full_attn_layers": [4, 8], "num_heads": 8,
                        "head_dim": 64, "short_conv_kernel_size": 4},
)


def write_checkpoint(out: Path) -> Path:
    from safetensors.numpy import save_file

    from kimi_mlx.demo import layer_tensors

    rng = np.random.default_rng(0)
    D, V = SHAPE["hidden_size"], SHAPE["vocab_size"]
    t = {"model.embed_tokens.weight": rng.standard_normal((V, D), np.float32),
         "model.norm.weight": np.ones(D, np.float32),
         "lm_head.weight": 0.02 * rng.standard_normal((V, D), np.float32)}
    for i in range(SHAPE["num_hidden_layers"]):
        t.update(layer_tensors(SHAPE, i, rng))
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(SHAPE))
    return out


def measure(model, n_prompt: int, n_decode: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one generation through the runtime."""
    from kimi_mlx.generate import generate_step
    from kimi_mlx.sample import Sampler

    prompt = np.random.default_rng(1).integers(3, SHAPE["vocab_size"], n_prompt).tolist()
    steps = generate_step(model, model.new_state(1), prompt, Sampler(0.0), max_tokens=n_decode + 1,
                          prefill_step_size=n_prompt)
    t0 = time.perf_counter()
    next(steps)
    t1 = time.perf_counter()
    for _ in steps:
        pass
    return n_prompt / (t1 - t0), n_decode / (time.perf_counter() - t1)


def rank_run(ckpt: str, out: str, n_prompt: int, n_decode: int, repeats: int) -> None:
    """The program of every rank: rank 0 measures; each rank writes its peak memory at exit."""
    from kimi_mlx.distributed import launch_rank, launched
    from kimi_mlx.distributed_driver import start
    from kimi_mlx.weights.load import load_model

    rank, out = launch_rank(), Path(out)
    atexit.register(lambda: (out / f"rank{rank}.json").write_text(json.dumps({"peak": mx.get_peak_memory()})))
    model = start(Path(ckpt)) if launched() else load_model(ckpt)  # ranks > 0 serve rank 0 inside start()
    runs = [measure(model, n_prompt, n_decode) for _ in range(repeats + 1)][1:]
    (out / "timing.json").write_text(json.dumps({"prefill": max(r[0] for r in runs),
                                                 "decode": max(r[1] for r in runs)}))


def free_port(n: int) -> int:
    """The first of n consecutive free local ports."""
    import socket

    for base in range(47230, 60000, 16):
        try:
            for p in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise SystemExit("no free local ports")


def run(ranks: int, ckpt: Path, out: Path, args) -> dict:
    from kimi_mlx.distributed import layer_plan, tensor_bytes

    out.mkdir()
    me = [str(Path(__file__).resolve()), "--rank-run", str(ckpt), str(out), "--prompt", str(args.prompt),
          "--decode", str(args.decode), "--repeats", str(args.repeats)]
    if ranks == 1:
        cmd = [sys.executable, *me]
    else:
        launch = str(Path(sys.executable).parent / "mlx.launch")
        cmd = [launch, "--backend", "ring", "-n", str(ranks), "--starting-port", str(free_port(ranks)), "--python",
               sys.executable, "--", *me]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE)  # an open, silent stdin: mlx.launch spins on EOF
    if proc.wait() != 0:
        raise SystemExit(f"the {ranks}-rank run failed")
    proc.stdin.close()
    sizes = tensor_bytes(ckpt)
    plan = layer_plan(ckpt, SHAPE["num_hidden_layers"], ranks)
    weights = []
    for i, layers in enumerate(plan):
        own = [n for n in sizes if (n.startswith("model.layers.") and int(n.split(".")[2]) in layers)
               or (i == 0 and "embed_tokens" in n) or (i == ranks - 1 and n in ("model.norm.weight", "lm_head.weight"))]
        weights.append(sum(sizes[n] for n in own))
    timing = json.loads((out / "timing.json").read_text())
    peaks = [json.loads((out / f"rank{r}.json").read_text())["peak"] for r in range(ranks)]
    return {**timing, "peaks": peaks, "weights": weights, "plan": plan}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    ap.add_argument("--prompt", type=int, default=PROMPT, help="prompt tokens, prefilled in one step")
    ap.add_argument("--decode", type=int, default=DECODE, help="greedy tokens decoded after the prompt")
    ap.add_argument("--repeats", type=int, default=REPEATS, help="timed generations a run (after one warm-up)")
    ap.add_argument("--runs", default="1,2,1,2", help="rank counts of the runs, in order (alternating: "
                    "other load on the machine hits both alike)")
    ap.add_argument("--rank-run", nargs=2, metavar=("CKPT", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_run:
        return rank_run(*args.rank_run, args.prompt, args.decode, args.repeats)
    echo = Recorder()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(Path(tmp))
        results = {}
        for i, n in enumerate(int(x) for x in args.runs.split(",")):
            r = run(n, ckpt, Path(tmp) / f"run{i}", args)
            best = results.setdefault(n, r)
            best["prefill"], best["decode"] = max(best["prefill"], r["prefill"]), max(best["decode"], r["decode"])
    echo(f"device: {platform.machine()} {mx.default_device()} | mlx {mx.__version__} | ring backend over loopback")
    echo(f"model: random weights, 8 layers (6 KDA, 2 MLA, MoE 16 experts top-4), hidden 512, float32; "
         f"prompt {args.prompt} tokens in one step, then {args.decode} greedy tokens; best of {args.repeats}")
    echo("ranks | layers per rank  | prefill tok/s | decode tok/s | weights per rank (MB) | peak per rank (MB)")
    for n, r in results.items():
        layers = " ".join(f"{p.start}-{p.stop - 1}" for p in r["plan"])
        weights = " ".join(f"{w / 1e6:.0f}" for w in r["weights"])
        peaks = " ".join(f"{p / 1e6:.0f}" for p in r["peaks"])
        echo(f"{n:5d} | {layers:16s} | {r['prefill']:13.1f} | {r['decode']:12.1f} | {weights:21s} | {peaks}")
    if args.record:
        echo.append(f"Pipeline parallelism, 1 vs 2 ranks on one host — {platform.machine()} CPU")


if __name__ == "__main__":
    main()
