"""Mixture of experts: float32 sigmoid router with grouped top-k, stacked experts, shared expert."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelConfig
from ..ops.experts import weighted_sum
from ..ops.routing import route, router_logits
from .common import MLP


def _expert(a: mx.array, e: int) -> mx.array:
    """a[e] as a view (a[e:e+1] squeezed): a bare integer index is a gather, a copy of the expert's weights."""
    return a[e : e + 1].squeeze(0)


def _per_expert(x: mx.array, counts, matmul) -> mx.array:
    outs, start = [], 0
    for e, n in enumerate(counts):
        if n:
            outs.append(matmul(e, x[start : start + n]))
            start += n
    return mx.concatenate(outs, axis=0)


def _gather_mm_cpu(x: mx.array, weight: mx.array, idx: mx.array, sorted_indices: bool, lhs_indices) -> mx.array:
    """gather_mm of a bfloat16 / float16 bank on the CPU, whose GatherMM takes float32 only: the experts idx
    picks are gathered first (only they are cast, not the whole bank), renumbered 0..n-1 in idx's order (so
    sorted indices stay sorted), multiplied in float32 and rounded back to the dtype gather_mm would return."""
    out_dtype = mx.result_type(x, weight)
    picked = weight[idx.flatten()].astype(mx.float32).swapaxes(-1, -2)
    local = mx.arange(idx.size, dtype=mx.uint32).reshape(idx.shape)
    y = mx.gather_mm(x.astype(mx.float32), picked, lhs_indices=lhs_indices, rhs_indices=local,
                     sorted_indices=sorted_indices)
    return y.astype(out_dtype)


class SwitchLinear(nn.Module):
    """A bank of E linear maps, weight [E, out, in]; applies the ones picked per token."""

    def __init__(self, num_experts: int, dims_in: int, dims_out: int):
        super().__init__()
        self.weight = mx.zeros((num_experts, dims_out, dims_in))

    def __call__(self, x: mx.array, idx: mx.array, sorted_indices: bool = False, lhs_indices=None) -> mx.array:
        if mx.default_device() == mx.cpu and (x.dtype != mx.float32 or self.weight.dtype != mx.float32):
            return _gather_mm_cpu(x, self.weight, idx, sorted_indices, lhs_indices)
        return mx.gather_mm(x, self.weight.swapaxes(-1, -2), lhs_indices=lhs_indices, rhs_indices=idx,
                            sorted_indices=sorted_indices)

    def segmented(self, x: mx.array, counts) -> mx.array:
        """x: [M, in] rows sorted by expert, counts[e] rows each -> [M, out]: one dense matmul per expert."""
        return _per_expert(x, counts, lambda e, rows: rows @ _expert(self.weight, e).T)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine", **kw):
        return QuantizedSwitchLinear.from_float(self, group_size, bits, mode)


class QuantizedSwitchLinear(nn.Module):
    def __init__(self, num_experts, dims_in, dims_out, group_size=64, bits=4, mode="affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        w, *sb = mx.quantize(mx.zeros((num_experts, dims_out, dims_in)), group_size, bits, mode=mode)
        self.weight, self.scales = w, sb[0]
        if len(sb) > 1:
            self.biases = sb[1]

    @classmethod
    def from_float(cls, lin: SwitchLinear, group_size, bits, mode):
        E, out, inp = lin.weight.shape
        q = cls(E, inp, out, group_size, bits, mode)
        w, *sb = mx.quantize(lin.weight, group_size, bits, mode=mode)
        q.weight, q.scales = w, sb[0]
        if len(sb) > 1:
            q.biases = sb[1]
        return q

    def segmented(self, x: mx.array, counts) -> mx.array:
        def one(e, rows):
            return mx.quantized_matmul(rows, _expert(self.weight, e), _expert(self.scales, e),
                                       _expert(self["biases"], e) if "biases" in self else None, transpose=True,
                                       group_size=self.group_size, bits=self.bits, mode=self.mode)
        return _per_expert(x, counts, one)

    def __call__(self, x: mx.array, idx: mx.array, sorted_indices: bool = False, lhs_indices=None) -> mx.array:
        return mx.gather_qmm(
            x, self.weight, self.scales, self.get("biases"), lhs_indices=lhs_indices, rhs_indices=idx,
            transpose=True, group_size=self.group_size, bits=self.bits, mode=self.mode,
            sorted_indices=sorted_indices,
        )


class SwitchGLU(nn.Module):
    def __init__(self, dims: int, hidden: int, num_experts: int):
        super().__init__()
        self.gate_proj = SwitchLinear(num_experts, dims, hidden)
        self.up_proj = SwitchLinear(num_experts, dims, hidden)
        self.down_proj = SwitchLinear(num_experts, hidden, dims)

    def __call__(self, x: mx.array, idx: mx.array) -> mx.array:
        """x: [N, D]; idx: [N, k].  Returns [N, k, D]. The plain gather (the reference; the fast
        prefill paths live in model/fuse.py's FusedMoE)."""
        xs = x[:, None, None]
        h = nn.silu(self.gate_proj(xs, idx)) * self.up_proj(xs, idx)
        return self.down_proj(h, idx).reshape(*idx.shape, -1)


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = mx.zeros((cfg.num_experts, cfg.hidden_size))
        self.e_score_correction_bias = mx.zeros((cfg.num_experts,))
        self.opts = dict(
            top_k=cfg.num_experts_per_token, n_group=cfg.num_expert_group, topk_group=cfg.topk_group,
            renormalize=cfg.moe_renormalize, scaling=cfg.routed_scaling_factor,
            bias_in_weights=cfg.router_bias_in_weights,
        )

    def __call__(self, x: mx.array, shared: int = 0):
        """x: [N, D] -> (indices [N, k + shared] int32, weights [N, k + shared] f32): the k picks, then
        `shared` always-on experts numbered from num_experts with weight 1. Float32 router matmul as upstream."""
        logits = router_logits(x, self.weight)
        return route(logits, self.e_score_correction_bias, shared=shared, **self.opts)


class KimiMoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = SwitchGLU(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts)
        if cfg.num_shared_experts:
            self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts)

    def __call__(self, x: mx.array) -> mx.array:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        idx, w = self.gate(flat)
        y = weighted_sum(self.experts(flat, idx), w).astype(x.dtype).reshape(shape)
        if "shared_experts" in self:
            y = y + self.shared_experts(x)
        return y
