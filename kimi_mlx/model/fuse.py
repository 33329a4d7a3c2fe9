"""Load-time fusion for speed: fewer, larger matmuls per token. The unfused modules are the reference.

MoE: expert gate and up projections are stacked into one bank ([E, 2I, D]) and the shared expert joins
the bank as S extra experts that every token uses with weight 1 (a SwiGLU of width S*I splits exactly
into S SwiGLUs of width I). One gather matmul then serves routed and shared experts alike.
"""

from __future__ import annotations


import mlx.core as mx
import mlx.nn as nn
import numpy as np
from metal_kernels import usable

from .. import settings
from ..errors import ConfigError
from ..ops.attention import absorb_matrix, value_matrix
from ..ops.experts import KERNEL_BITS, experts_kernel, experts_ref, kernel_fits, weighted_sum
from ..ops.fast_math import silu
from ..ops.kda import gpu_backend
from ..ops.linear import dequant_linears
from .common import MLP
from .kda import KimiDeltaAttention
from .mla import KimiMLA
from .moe import KimiMoE, QuantizedSwitchLinear


def _qparams(m: nn.Module):
    if isinstance(m, (nn.QuantizedLinear, QuantizedSwitchLinear)):
        return (m.group_size, m.bits, m.mode)
    return None


def _parts(m: nn.Module) -> dict[str, mx.array]:
    keys = ("weight", "scales", "biases")
    return {k: m[k] for k in keys if k in m}


def _bank(parts: list[dict], axis: int) -> dict:
    return {k: mx.concatenate([p[k] for p in parts], axis=axis) for k in parts[0]}


def _as_bank(lin: nn.Module, n: int) -> dict:
    """A dense (quantized) Linear of width n*I split into n experts: [n, I, ...]."""
    return {k: v.reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in _parts(lin).items()}


def _down_bank(lin: nn.Module, n: int) -> dict:
    """down_proj [D, n*I] -> [n, D, I] (for quantized weights the packed input axis splits the same way)."""
    return {k: mx.stack(mx.split(v, n, axis=1)) for k, v in _parts(lin).items()}


def _like(template: nn.Module, arrays: dict) -> nn.Module:
    """A module of template's class (plain or quantized Linear / SwitchLinear) holding `arrays`."""
    m = type(template).__new__(type(template))
    nn.Module.__init__(m)
    if _qparams(template):
        m.group_size, m.bits, m.mode = _qparams(template)
    for k, v in arrays.items():
        setattr(m, k, v)
    return m


class FusedMoE(nn.Module):
    """KimiMoE with one gate|up bank and one down bank holding routed + shared experts."""

    def __init__(self, moe: KimiMoE, num_shared: int):
        super().__init__()
        self.gate = moe.gate
        self.num_routed = moe.gate.weight.shape[0]
        self.num_shared = num_shared
        ex = moe.experts
        gate_up = [_bank([_parts(ex.gate_proj), _parts(ex.up_proj)], axis=1)]
        down = [_parts(ex.down_proj)]
        if num_shared:
            sh: MLP = moe.shared_experts
            gate_up.append(_bank([_as_bank(sh.gate_proj, num_shared), _as_bank(sh.up_proj, num_shared)], axis=1))
            down.append(_down_bank(sh.down_proj, num_shared))
        self.gate_up_proj = _like(ex.gate_proj, _bank(gate_up, axis=0))
        self.down_proj = _like(ex.down_proj, _bank(down, axis=0))
        self.kernel_fits = kernel_fits(self.gate_up_proj, self.down_proj, moe.gate.opts["top_k"] + num_shared)

    def path(self, tokens: int, decode: bool = False) -> str:
        """The expert path (expert_path) for a call over this many tokens (decode: one token a sequence)."""
        pairs = tokens * (self.gate.opts["top_k"] + self.num_shared)
        return expert_path(pairs, self.num_routed + self.num_shared,
                           self.kernel_fits and usable("moe_gate_up") and usable("moe_down"), decode)

    def __call__(self, x: mx.array, path: str | None = None) -> mx.array:
        """path: the expert path to take (None: self.path of the call's token count; model/verify.py gives a
        few tokens the one-token path, so each row is computed as decode computes it)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        idx, w = self.gate(flat, shared=self.num_shared)  # the shared experts ride along as the last columns
        path = path or self.path(flat.shape[0], decode=len(shape) == 3 and shape[1] == 1)
        out = experts_out(path, flat, idx, w, self.gate_up_proj, self.down_proj, self.num_routed + self.num_shared)
        # the float32 sum, unrounded: the residual seam rounds it to the residual's dtype (as
        # h + r.astype(h.dtype)), in decode inside the add + norm kernel, so no cast launch a MoE layer
        return out.reshape(shape)


def experts_out(path: str, flat: mx.array, idx: mx.array, w: mx.array, gate_up: nn.Module, down: nn.Module,
                experts: int) -> mx.array:
    """The (token, expert) pairs idx [N, P] of rows flat [N, D] through a gate|up bank and a down bank of
    `experts` experts on expert path `path`, weighted by w and summed: [N, D] float32. The resident FusedMoE
    passes its whole banks; model/offload.py passes a slot pool or a step's working set with idx renumbered into
    it (each pair's result depends only on its row and its expert's weights, so the output is the same)."""
    k = idx.shape[1]
    if path in ("kernel", "union", "wide"):  # decode on a GPU: two kernels over the quantized banks (ops/experts.py)
        return experts_kernel(flat, idx, w, gate_up, down, union=path == "union", wide=path == "wide")
    if path == "gather":  # decode otherwise: MLX's gather matmuls (the kernels' reference twin)
        return experts_ref(flat, idx, w, gate_up, down)
    if path == "bounded":  # prefill on CUDA: expert-sorted rows in fixed blocks, one gather matmul a bank
        # (as many blocks as any routing could need, so no count read back)
        blocks = ExpertBlocks(idx, experts)
        g, u = mx.split(gate_up(blocks.rows(flat), blocks.expert), 2, axis=-1)
        return weighted_sum(blocks.pairs(down(silu(g) * u, blocks.expert)), w)
    if path == "segmented":  # prefill on CPU: tokens grouped by expert, one dense matmul each
        order = mx.argsort(idx.flatten())
        counts = np.bincount(np.array(idx).reshape(-1), minlength=experts).tolist()
        g, u = mx.split(gate_up.segmented(flat[order // k], counts), 2, axis=-1)
        return weighted_sum(down.segmented(silu(g) * u, counts)[mx.argsort(order)], w)
    # "sorted", prefill: tokens sorted by expert so each expert's rows are contiguous
    order = mx.argsort(idx.flatten())
    xs, ids = flat[order // k][:, None], idx.flatten()[order]
    g, u = mx.split(gate_up(xs, ids, True), 2, axis=-1)
    return weighted_sum(down(silu(g) * u, ids, True)[mx.argsort(order)], w)


class ExpertBlocks:
    """(token, expert) pairs laid out expert by expert in blocks of BLOCK rows, each block one expert's.

    A bank applied to rows [NB, BLOCK, D] with one expert index per block is then one gather matmul whose
    every batch item is a BLOCK-row tile (MLX's CUDA gather_qmm tiles each batch item's rows, so expert-
    sorted single rows waste most of every tile). Padding rows are zero and never read back; the index
    maps are built on the device, and nothing comes back to the host: the block count is the most any routing
    of these pairs could need (every pair's full blocks plus one partial block an expert), the blocks past the
    used ones zero rows of the last expert, which the gather matmul computes and nothing reads (no host sync
    inside the layer, at the price of those blocks' matmuls).
    """

    BLOCK = 64

    def __init__(self, idx: mx.array, experts: int, block: int | None = None):
        self.block = b = block or self.BLOCK
        N, k = idx.shape
        flat = idx.flatten()
        order = mx.argsort(flat)
        counts = mx.zeros((experts,), mx.int32).at[flat].add(1)
        start = mx.cumsum(counts) - counts  # first sorted position of each expert
        nblk = (counts + b - 1) // b
        bend = mx.cumsum(nblk)
        e_sorted = flat[order]
        row = (bend - nblk)[e_sorted] * b + mx.arange(N * k) - start[e_sorted]  # padded row of each sorted pair
        self.row_of_pair = mx.zeros((N * k,), mx.int32).at[order].add(row.astype(mx.int32))
        nb = min(N * k // b + experts, N * k)
        # pair feeding each padded row; N * k marks a padding row (reads the zero row appended below)
        src = mx.full((nb * b,), N * k, mx.int32).at[row].add(order.astype(mx.int32) - N * k)
        self.token_of_row = src // k
        self.expert = mx.minimum((mx.arange(nb)[:, None] >= bend[None, :]).sum(-1), experts - 1).astype(mx.uint32)
        self.nb = nb

    def rows(self, x: mx.array) -> mx.array:
        """x [N, D] -> [NB, BLOCK, D] (zero rows for padding)."""
        x = mx.concatenate([x, mx.zeros((1, x.shape[-1]), x.dtype)])
        return take_rows(x, self.token_of_row).reshape(self.nb, self.block, -1)

    def pairs(self, y: mx.array) -> mx.array:
        """[NB, BLOCK, D] -> [N * k, D] in pair order (token-major, as idx.flatten())."""
        return take_rows(y.reshape(-1, y.shape[-1]), self.row_of_pair)


def take_rows(x: mx.array, idx: mx.array) -> mx.array:
    """x[idx] for a row-contiguous x [M, D], bit for bit, moving 8 bytes an element where a row's bytes allow:
    MLX's gather runs a thread per element, so bfloat16 rows move in a quarter of the threads as uint64
    (RESULTS.md times a prefill step's row gathers both ways)."""
    if (x.shape[-1] * x.itemsize) % 8 or x.itemsize >= 8:
        return x[idx]
    return x.view(mx.uint64)[idx].view(x.dtype)


EXPERTS_ENV = "KIMI_MLX_EXPERTS"


def choose_experts(f: settings.Facts, pairs: int, kernel_fits: bool = False, decode: bool = False) -> str:
    """How N*k (token, expert) pairs meet an expert bank: 'kernel' (few pairs, decode, on a GPU, where
    the banks are ones ops/experts.py's kernels read: kernel_fits), 'gather' (few pairs otherwise: MLX's
    gather matmuls, the kernels' reference), 'sorted' (gather_mm over expert-sorted rows: Metal's prefill
    kernel), 'segmented' (one matmul per expert over its rows: CPU, measured 3.5x gather_mm) or 'bounded'
    (ExpertBlocks: CUDA, where gather_qmm over single sorted rows measured ~60x under the card's matmul
    rate; as many blocks as any routing could need, so nothing is read back to the host and a prefill step
    queues without a stop). KIMI_MLX_EXPERTS=gather|kernel|sorted|segmented|bounded overrides; the three
    prefill paths only for calls of 64+ pairs (a one-token step on them would be slow, and on 'segmented' would
    read the host inside a compiled decode step). decode (one token for each of a batch's sequences, in a decode
    step): 'kernel' or 'gather' however many pairs, as for one sequence (a batch of B rows is B * k pairs, a
    decode step's shape: each pair a matrix-vector product; the prefill paths' sorting and blocks would cost
    more launches than the pairs, and 'segmented' reads the host). 'union' (only when forced): the decode kernels with
    the gate|up bank read once per distinct expert of the call's tokens (moe_gate_up_union), for batches whose rows
    share experts; 'wide' (only when forced): the decode kernels reading 16 bytes a load (moe_gate_up_wide,
    moe_down_wide). Each falls back to 'kernel' where its kernels are switched off; a prefill call (64+ pairs, not
    decode) takes the automatic choice."""
    forced = f[EXPERTS_ENV]
    if forced in ("kernel", "union", "wide") and not (kernel_fits and f.gpu):
        raise ConfigError(f"{EXPERTS_ENV}={forced} needs a Metal or CUDA device and affine "
                          f"{'/'.join(map(str, KERNEL_BITS))}-bit expert banks; unset it or pick another path")
    if forced in ("union", "wide"):  # decode kernels of their own (union: gate|up reading each expert once)
        if decode or pairs < 64:
            own = ("moe_gate_up_union",) if forced == "union" else ("moe_gate_up_wide", "moe_down_wide")
            return forced if all(f.usable(k) for k in own) else "kernel"
        forced = "auto"  # a prefill call takes its own path: these are decode paths
    if forced in ("gather", "kernel") or (forced != "auto" and pairs >= 64 and not decode):
        return forced
    if pairs < 64 or decode:
        return "kernel" if kernel_fits and f.gpu else "gather"
    if f.cpu:
        return "segmented"
    if f.cuda:
        return "bounded"
    return "sorted"  # Metal: MLX's gather_qmm has a kernel for expert-sorted rows


def expert_path(pairs: int, experts: int, kernel_fits: bool = False, decode: bool = False) -> str:
    return choose_experts(settings.now(gpu_backend()), pairs, kernel_fits, decode)




def can_fuse_moe(moe: KimiMoE) -> bool:
    """gate and up must be stored alike (one bank); shared experts like the routed ones, bank by bank.
    The down bank may differ from gate|up (mixed recipes give it more bits)."""
    ex = moe.experts
    if _qparams(ex.gate_proj) != _qparams(ex.up_proj):
        return False
    if "shared_experts" in moe:
        sh = moe.shared_experts
        if {_qparams(sh.gate_proj), _qparams(sh.up_proj)} != {_qparams(ex.gate_proj)}:
            return False
        if _qparams(sh.down_proj) != _qparams(ex.down_proj):
            return False
        if sh.gate_proj.weight.dtype != ex.gate_proj.weight.dtype or sh.down_proj.weight.dtype != ex.down_proj.weight.dtype:
            return False
    return True


def fuse_kda_inputs(attn: KimiDeltaAttention) -> bool:
    """f_a_proj | g_a_proj | b_proj read the same x: one matmul `gates_in` when stored alike."""
    parts = [attn.f_a_proj, attn.g_a_proj, attn.b_proj]
    if len({_qparams(p) for p in parts}) != 1 or len({p.weight.dtype for p in parts}) != 1:
        return False
    attn.gates_in = _like(parts[0], _bank([_parts(p) for p in parts], axis=0))
    for name in ("f_a_proj", "g_a_proj", "b_proj"):
        delattr(attn, name)
    return True


def fuse_gate_outputs(attn: KimiDeltaAttention) -> bool:
    """f_b_proj and g_b_proj as one block-diagonal matmul for decode (`gates_out`): [f_a | g_a], the first 2D
    columns of gates_in's output, -> [f_b(f_a) | g_b(g_a)], one launch where there were two. The zero blocks are
    zero words, scales and biases (exact zeros); derived at load like q_absorb (not in the model's identity), the
    two projections stay for prefill. Needs gates_in and both projections stored alike."""
    f, g = attn.f_b_proj, attn.g_b_proj
    if "gates_in" not in attn or _qparams(f) != _qparams(g) or f.weight.dtype != g.weight.dtype:
        return False
    pf, pg = _parts(f), _parts(g)
    if pf.keys() != pg.keys() or any(pf[k].shape != pg[k].shape for k in pf):
        return False
    attn.gates_out = _like(f, {k: mx.concatenate([mx.concatenate([pf[k], mx.zeros_like(pg[k])], axis=1),
                                                  mx.concatenate([mx.zeros_like(pf[k]), pg[k]], axis=1)], axis=0)
                               for k in pf})
    return True


def fuse_mla_inputs(attn: KimiMLA) -> bool:
    """q_proj and kv_a_proj_with_mqa read the same x: for decode one matmul `q_kv` ([q | latent | pe] rows), one
    launch where there were two. Derived at load like gates_out (not in the model's identity); the two stay for
    prefill. Needs both stored alike."""
    parts = [attn.q_proj, attn.kv_a_proj_with_mqa]
    if len({_qparams(p) for p in parts}) != 1 or len({p.weight.dtype for p in parts}) != 1:
        return False
    attn.q_kv = _like(parts[0], _bank([_parts(p) for p in parts], axis=0))
    return True


def fuse_model(model, offload=None) -> int:
    """Fuse in place: MoE banks, KDA input projections, float32 router weights, MLA decode's input projection,
    absorbed query and value matrices; the layers' quantized linears become DequantLinear. Returns how many blocks.
    offload: a model/offload.Offload whose MoE layers stream their routed experts (their banks never loaded)."""
    n = 0
    shared = model.config.num_shared_experts
    for i in model.owned:
        layer = model.model.layers[i]
        if isinstance(layer.mlp, KimiMoE) and offload is not None:
            if not can_fuse_moe(layer.mlp):
                raise ConfigError(f"layer {i}: experts_memory needs the gate and up expert banks (and the shared "
                                  "expert) stored alike; load this checkpoint without it")
            layer.mlp = offload.moe(i, layer.mlp, shared if "shared_experts" in layer.mlp else 0)
            n += 1
        elif isinstance(layer.mlp, KimiMoE) and can_fuse_moe(layer.mlp):
            layer.mlp = FusedMoE(layer.mlp, shared if "shared_experts" in layer.mlp else 0)
            n += 1
        if "gate" in layer.mlp:  # the router works in float32 (as upstream): cast once, not per call
            layer.mlp.gate.weight = layer.mlp.gate.weight.astype(mx.float32)
            layer.mlp.gate.e_score_correction_bias = layer.mlp.gate.e_score_correction_bias.astype(mx.float32)
        if isinstance(layer.self_attn, KimiDeltaAttention):  # its gated norm and gates work in float32
            for name in ("o_norm_weight", "A_log", "dt_bias"):
                setattr(layer.self_attn, name, getattr(layer.self_attn, name).astype(mx.float32))
            n += fuse_kda_inputs(layer.self_attn)
            fuse_gate_outputs(layer.self_attn)
        if isinstance(layer.self_attn, KimiMLA):  # decode's absorbed query and values without slices
            a = layer.self_attn
            a.q_absorb = absorb_matrix(a.k_up, a.pe, a.scale)
            a.v_absorb = value_matrix(a.v_up, a.pe)
            fuse_mla_inputs(a)
        dequant_linears(layer)  # prefill's projections: dequantize + dense matmul where chosen (ops/linear.py)
    model.retrace()  # compiled steps close over the old modules
    mx.eval(model.parameters())
    return n
