"""Train the small Kimi Linear demo with the upstream torch implementation (transformers).

Runs on a CUDA GPU (bf16 autocast; the KDA recurrence runs in f32 inside transformers) or, for a
smoke test, on the CPU. Real architecture pattern: KDA and MLA layers 3:1, first layer dense, MoE
with a shared expert and sigmoid top-k routing; the router's score-correction bias is trained the
aux-loss-free way (bias += rate * sign(mean load - expert load) after each step).

    python tools/train_demo.py --tokens .demo_build/tokens.npz --out OUTDIR --time-budget 330

The number of steps is fixed from --steps, or, with --time-budget, from the measured step time
after the warm-up steps (the chosen number is recorded: rerun with --steps N to repeat the
schedule). OUTDIR gets model-0000k.safetensors shards (float32, torch module names), config.json
(transformers KimiLinearConfig keyword arguments), train_log.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

N_RANKS = 4096
SPECIAL = 256


@dataclass
class Arch:
    hidden: int = 192
    layers: int = 8  # every 4th layer (1-based) is MLA, the rest KDA; layer 0 has the dense MLP
    kda_heads: int = 3
    kda_head_dim: int = 64
    mla_heads: int = 4
    kv_lora_rank: int = 64
    experts: int = 8
    experts_per_token: int = 2
    expert_width: int = 64
    dense_width: int = 384


@dataclass
class Train:
    seq_len: int = 1024
    batch: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 150
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    bias_rate: float = 2e-3
    steps: int = 0  # 0: choose from the time budget
    max_steps: int = 20000
    time_budget: float = 330.0
    eval_every: int = 200
    seed: int = 0


def config_kwargs(a: Arch) -> dict:
    """transformers KimiLinearConfig keyword arguments (as tests/hf_oracle.py builds them)."""
    kinds = ["m" if (i + 1) % 4 == 0 else "k" for i in range(a.layers)]
    return dict(
        vocab_size=N_RANKS + SPECIAL, hidden_size=a.hidden, intermediate_size=a.dense_width,
        moe_intermediate_size=a.expert_width, num_hidden_layers=a.layers, num_attention_heads=a.mla_heads,
        num_key_value_heads=a.mla_heads, kv_lora_rank=a.kv_lora_rank, q_lora_rank=None, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, num_local_experts=a.experts, num_experts_per_tok=a.experts_per_token,
        n_group=1, topk_group=1, n_shared_experts=1, routed_scaling_factor=2.446, first_k_dense_replace=1,
        norm_topk_prob=True, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=N_RANKS, eos_token_id=N_RANKS + 2, pad_token_id=N_RANKS + 255,
        linear_attn_config={"head_dim": a.kda_head_dim, "num_heads": a.kda_heads, "short_conv_kernel_size": 4,
                            "kda_layers": [i + 1 for i, c in enumerate(kinds) if c == "k"],
                            "full_attn_layers": [i + 1 for i, c in enumerate(kinds) if c == "m"]},
    )


def make_model(kwargs: dict, seed: int):
    from transformers import KimiLinearConfig, KimiLinearForCausalLM

    torch.manual_seed(seed)
    return KimiLinearForCausalLM(KimiLinearConfig(**kwargs))


class RouterLoad:
    """Counts each router's expert picks during a step; nudges its correction bias after the step."""

    def __init__(self, model, rate: float):
        from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearTopkRouter

        self.routers = [m for m in model.modules() if isinstance(m, KimiLinearTopkRouter)]
        self.rate = rate
        self.counts = [torch.zeros(r.num_experts, device=r.weight.device) for r in self.routers]
        for r, c in zip(self.routers, self.counts):
            r.register_forward_hook(self._hook(c))

    @staticmethod
    def _hook(counts: torch.Tensor):
        def hook(mod, inp, out):  # out = (router_logits, topk_weights, topk_indices); returns None
            if mod.training:
                counts.add_(torch.bincount(out[2].flatten(), minlength=counts.numel()).float())
        return hook

    @torch.no_grad()
    def update(self) -> float:
        """Apply the bias update; return the worst max/mean load ratio seen this step."""
        worst = 0.0
        for r, c in zip(self.routers, self.counts):
            r.e_score_correction_bias.add_(self.rate * torch.sign(c.mean() - c))
            worst = max(worst, float(c.max() / c.mean().clamp_min(1)))
            c.zero_()
        return worst


def param_groups(model, wd: float):
    decay, keep = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "norm" not in name else keep).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": keep, "weight_decay": 0.0}]


def lr_at(step: int, total: int, t: Train) -> float:
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    frac = min(1.0, (step - t.warmup) / max(1, total - t.warmup))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def batches(tokens: torch.Tensor, t: Train, gen: torch.Generator):
    n = tokens.numel() - t.seq_len - 1
    ar = torch.arange(t.seq_len + 1, device=tokens.device)
    while True:
        starts = torch.randint(0, n, (t.batch,), generator=gen, device="cpu").to(tokens.device)
        w = tokens[starts[:, None] + ar].long()
        yield w[:, :-1], w[:, 1:]


def loss_of(model, x, y, dev: str) -> torch.Tensor:
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
        logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, t: Train, dev: str, max_windows: int = 64) -> float:
    """Mean next-token loss (nats) over consecutive non-overlapping windows of held-out tokens."""
    model.eval()
    n = min(max_windows, (ids.numel() - 1) // t.seq_len)
    x = ids[: n * t.seq_len].view(n, t.seq_len).long()
    y = ids[1 : n * t.seq_len + 1].view(n, t.seq_len).long()
    losses = [float(loss_of(model, x[i : i + 8], y[i : i + 8], dev)) for i in range(0, n, 8)]
    model.train()
    return float(np.mean(losses))


def save(model, kwargs: dict, out: Path, log: dict, shard_bytes: int = 12 << 20) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    shards, cur, size = [], {}, 0
    for k, v in sd.items():
        if cur and size + v.numel() * 4 > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += v.numel() * 4
    shards.append(cur)
    for i, s in enumerate(shards):
        save_file(s, str(out / f"model-{i:05d}.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(kwargs, indent=1))
    (out / "train_log.json").write_text(json.dumps(log, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=Path, default=Path(".demo_build/tokens.npz"))
    ap.add_argument("--out", type=Path, required=True)
    for name, f in {**Arch.__dataclass_fields__, **Train.__dataclass_fields__}.items():
        ap.add_argument("--" + name.replace("_", "-"), type=type(f.default), default=f.default)
    args = ap.parse_args()
    arch = Arch(**{k: getattr(args, k) for k in Arch.__dataclass_fields__})
    t = Train(**{k: getattr(args, k) for k in Train.__dataclass_fields__})
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()

    data = np.load(args.tokens)
    train_ids = torch.from_numpy(data["train"].astype(np.int32)).to(dev)
    held_ids = torch.from_numpy(data["heldout_code"].astype(np.int32)).to(dev)
    chat_ids = torch.from_numpy(data["heldout_chat"].astype(np.int32)).to(dev)
    kwargs = config_kwargs(arch)
    model = make_model(kwargs, t.seed).to(dev).train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(0.9, 0.95), eps=1e-8,
                            fused=dev == "cuda")
    load = RouterLoad(model, t.bias_rate)
    gen = torch.Generator().manual_seed(t.seed)
    data_iter = batches(train_ids, t, gen)
    total = t.steps or t.max_steps
    log = {"arch": asdict(arch), "train": asdict(t), "params": n_params, "device": torch.cuda.get_device_name()
           if dev == "cuda" else "cpu", "torch": torch.__version__, "history": [], "evals": []}
    import transformers

    log["transformers"] = transformers.__version__
    print(f"params {n_params/1e6:.3f}M, train tokens {train_ids.numel()}, device {log['device']}", flush=True)
    step, t_start, t_measure = 0, time.time(), None
    while step < total:
        lr = lr_at(step, total, t)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = next(data_iter)
        try:
            loss = loss_of(model, x, y, dev)
            loss.backward()
        except torch.cuda.OutOfMemoryError:
            if step or t.batch == 1:
                raise
            opt.zero_grad(set_to_none=True)
            loss = None
            torch.cuda.empty_cache()
            t.batch //= 2  # first step only: halve the batch until it fits (recorded in the log)
            data_iter = batches(train_ids, t, gen)
            print(f"out of memory: batch -> {t.batch}", flush=True)
            continue
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        imbalance = load.update()
        step += 1
        if step == 3:
            t_measure = time.time()
        if step == 13 and not t.steps:  # fix the schedule's length from the measured step time
            per = (time.time() - t_measure) / 10
            total = int(min(t.max_steps, step + (t.time_budget - (time.time() - t_start)) / per))
            log["chosen_steps"] = total
            print(f"step time {per*1000:.0f} ms -> {total} steps", flush=True)
        if step % 25 == 0 or step == total:
            rec = {"step": step, "loss": float(loss.detach()), "lr": lr, "gnorm": gnorm, "imbalance": imbalance,
                   "elapsed": time.time() - t_start}
            log["history"].append(rec)
            print(json.dumps(rec), flush=True)
        if step % t.eval_every == 0 or step == total:
            ev = {"step": step, "heldout_loss": evaluate(model, held_ids, t, dev),
                  "heldout_chat_loss": evaluate(model, chat_ids, t, dev)}
            log["evals"].append(ev)
            print(json.dumps(ev), flush=True)
        if step % 500 == 0:  # a checkpoint that survives a run cut off at its time limit
            save(model, kwargs, args.out, log)
    log["final_batch"] = t.batch
    log["train_seconds"] = time.time() - t_start
    log["tokens_seen"] = step * t.batch * t.seq_len
    log["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9 if dev == "cuda" else None
    log["wall_seconds"] = time.time() - t0
    save(model, kwargs, args.out, log)
    print(json.dumps({k: v for k, v in log.items() if k not in ("history", "evals")}), flush=True)


if __name__ == "__main__":
    main()
