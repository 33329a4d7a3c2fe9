"""Router semantics against a numpy reference: selection bias, groups, HF remote-code switch."""

import mlx.core as mx
import numpy as np
import pytest

from kimi_mlx.ops.routing import route_ref


def route(x, w, bias, **opts):
    return route_ref(x.astype(mx.float32) @ w.astype(mx.float32).T, bias, **opts)


def np_route(x, w, bias, k, n_group, topk_group, renorm, scale, bias_in_weights):
    s = 1 / (1 + np.exp(-(x @ w.T)))
    choice = s + bias
    N, E = choice.shape
    if n_group > 1:
        g = np.sort(choice.reshape(N, n_group, -1), -1)[..., -2:].sum(-1)
        keep = np.argsort(-g, -1)[:, :topk_group]
        mask = np.zeros((N, n_group), bool)
        np.put_along_axis(mask, keep, True, -1)
        choice = np.where(np.repeat(mask, E // n_group, -1), choice, -np.inf)
    idx = np.argsort(-choice, -1)[:, :k]
    wts = np.take_along_axis(choice if bias_in_weights else s, idx, -1)
    if renorm:
        wts = wts / (wts.sum(-1, keepdims=True) + 1e-20)
    return idx, wts * scale


@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2), (8, 3)])
@pytest.mark.parametrize("bias_in_weights", [False, True])
@pytest.mark.parametrize("renorm", [False, True])
def test_route_matches_numpy(n_group, topk_group, bias_in_weights, renorm):
    rng = np.random.default_rng(n_group * 10 + topk_group)
    x = rng.standard_normal((37, 16)).astype(np.float32)
    w = rng.standard_normal((32, 16)).astype(np.float32) * 0.5
    bias = rng.standard_normal(32).astype(np.float32) * 0.3
    opts = dict(top_k=4, n_group=n_group, topk_group=topk_group, renormalize=renorm, scaling=2.446,
                bias_in_weights=bias_in_weights)
    idx, wts = route(mx.array(x), mx.array(w), mx.array(bias), **opts)
    ref_idx, ref_w = np_route(x, w, bias, 4, n_group, topk_group, renorm, 2.446, bias_in_weights)
    order = np.argsort(np.array(idx), -1)
    got_idx = np.take_along_axis(np.array(idx), order, -1)
    got_w = np.take_along_axis(np.array(wts), order, -1)
    ref_order = np.argsort(ref_idx, -1)
    assert np.array_equal(got_idx, np.take_along_axis(ref_idx, ref_order, -1))
    np.testing.assert_allclose(got_w, np.take_along_axis(ref_w, ref_order, -1), rtol=1e-5, atol=1e-6)


def test_bias_changes_weights_only_in_hf_mode():
    rng = np.random.default_rng(0)
    x, w = mx.array(rng.standard_normal((5, 8)).astype(np.float32)), mx.array(rng.standard_normal((16, 8)).astype(np.float32))
    bias = mx.full((16,), 0.25)
    opts = dict(top_k=3, n_group=1, topk_group=1, renormalize=False, scaling=1.0)
    _, plain = route(x, w, bias, **opts)
    _, hf = route(x, w, bias, bias_in_weights=True, **opts)
    np.testing.assert_allclose(np.array(hf) - np.array(plain), 0.25, rtol=1e-5)


# -- the fused routing kernel ------------------------------------------------------------------

import kernel_emulator  # noqa: E402

from kimi_mlx.ops import routing  # noqa: E402

KERNEL_CASES = [  # E, k, n_group, topk_group, renormalize, bias_in_weights
    (256, 8, 1, 1, True, False),
    (64, 6, 8, 3, True, False),
    (128, 4, 4, 2, False, True),
    (32, 3, 1, 1, True, True),
]


def sorted_pairs(idx, w):
    idx, w = np.array(idx), np.array(w)
    order = np.argsort(idx, -1)
    return np.take_along_axis(idx, order, -1), np.take_along_axis(w, order, -1)


def kernel_inputs(E, N=5, seed=0):
    rng = np.random.default_rng(seed + E)
    logits = mx.array(rng.standard_normal((N, E)).astype(np.float32) * 2)
    bias = mx.array(rng.standard_normal(E).astype(np.float32) * 0.2)
    return logits, bias


@pytest.mark.skipif(not kernel_emulator.available(), reason="g++ is not installed")
@pytest.mark.parametrize("kind", ["metal", "cuda"])
@pytest.mark.parametrize("shared", [0, 2])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: f"E{c[0]}k{c[1]}g{c[2]}t{c[3]}")
def test_route_kernel_text_runs_right_on_cpu(kind, case, shared):
    E, k, ng, tg, renorm, bias_w = case
    assert routing.kernel_supports(E, k, ng)
    logits, bias = kernel_inputs(E)
    opts = dict(top_k=k, n_group=ng, topk_group=tg, renormalize=renorm, scaling=2.446, bias_in_weights=bias_w,
                shared=shared)
    N = logits.shape[0]
    idx, w = kernel_emulator.emulate(
        "moe_route", kind, [logits, bias, mx.array([2.446], mx.float32)],
        (("E", E), ("K", k), ("NG", ng), ("TG", tg), ("RENORM", int(renorm)), ("BIAS_W", int(bias_w)),
         ("SH", shared)),
        grid=(32, N, 1), threadgroup=(32, 1, 1), output_shapes=[(N, k + shared)] * 2,
        output_dtypes=[mx.int32, mx.float32],
    )
    assert np.array_equal(np.array(idx[:, k:]), np.broadcast_to(np.arange(E, E + shared), (N, shared)))
    assert np.all(np.array(w[:, k:]) == 1.0)
    got_i, got_w = sorted_pairs(idx, w)
    ref_i, ref_w = sorted_pairs(*routing.route_ref(logits, bias, **opts))
    assert np.array_equal(got_i, ref_i)
    np.testing.assert_allclose(got_w, ref_w, rtol=1e-5, atol=1e-6)
    # best first: the kernel returns picks in descending selection score
    choice = np.array(mx.sigmoid(logits) + bias)
    picked = np.take_along_axis(choice, np.array(idx[:, :k]), -1)
    assert np.all(np.diff(picked, axis=-1) <= 0)


def test_route_path_policy(monkeypatch):
    monkeypatch.setenv(routing.ENV, "ref")
    assert routing.path(256, 8, 1) == "ref"
    monkeypatch.setenv(routing.ENV, "bogus")
    with pytest.raises(Exception, match="KIMI_MLX_ROUTE"):
        routing.path(256, 8, 1)
    monkeypatch.delenv(routing.ENV)
    assert not routing.kernel_supports(48, 8, 1) and routing.kernel_supports(256, 8, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("shared", [0, 1])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: f"E{c[0]}k{c[1]}g{c[2]}t{c[3]}")
def test_route_kernel_on_gpu(case, shared):
    E, k, ng, tg, renorm, bias_w = case
    logits, bias = kernel_inputs(E, N=300, seed=3)
    opts = dict(top_k=k, n_group=ng, topk_group=tg, renormalize=renorm, scaling=2.446, bias_in_weights=bias_w,
                shared=shared)
    got_i, got_w = sorted_pairs(*routing.route_kernel(logits, bias, **opts))
    ref_i, ref_w = sorted_pairs(*routing.route_ref(logits, bias, **opts))
    assert np.array_equal(got_i, ref_i)
    np.testing.assert_allclose(got_w, ref_w, rtol=1e-5, atol=1e-6)


def test_doctor_reports_routing_and_expert_paths():
    from kimi_mlx import doctor

    env = dict(doctor.environment())
    assert env["MoE routing"] in ("ops", "fused metal kernel", "fused cuda kernel")
    assert "expert matmuls" in env["MoE prefill"]
    names = [c.name for c in doctor.run_checks()]
    assert "MoE routing, fused kernel" in names


@pytest.mark.gpu
def test_doctor_routing_check_on_gpu():
    from kimi_mlx import doctor

    assert doctor.check_routing().ok


# -- the MoE decode expert kernels ---------------------------------------------------------------

from metal_kernels import group_rows  # noqa: E402

from kimi_mlx import doctor  # noqa: E402
from kimi_mlx.ops import experts  # noqa: E402

EXPERT_CASES = [  # bits (gate|up), bits (down), group size, dtype of x and of the scales
    (4, 4, 64, mx.float32),
    (4, 8, 32, mx.bfloat16),
    (2, 2, 128, mx.float32),
    (8, 4, 64, mx.bfloat16),
]


def emulate_experts(kind, x, idx, w, gate_up, down):
    """experts_kernel's two launches, run by the emulator."""
    N, P = idx.shape
    D, I = x.shape[-1], gate_up.weight.shape[1] // 2
    Ru, Rd = experts.units(I), experts.units(D)
    (h,) = kernel_emulator.emulate(
        "moe_gate_up", kind, [x, idx, gate_up.weight, gate_up.scales, gate_up.biases],
        tuple(experts._template(D, I, P, gate_up, Ru)), grid=(32 * N * P, I // Ru, 1),
        threadgroup=(32, group_rows(I // Ru), 1), output_shapes=[(N * P, I)], output_dtypes=[mx.float32],
    )
    (y,) = kernel_emulator.emulate(
        "moe_down", kind, [h, idx, w, down.weight, down.scales, down.biases], tuple(experts._template(D, I, P, down, Rd)),
        grid=(32 * D // Rd, P, N), threadgroup=(32, P, 1), output_shapes=[(N, D)], output_dtypes=[mx.float32],
    )
    return y


@pytest.mark.skipif(not kernel_emulator.available(), reason="g++ is not installed")
@pytest.mark.parametrize("kind", ["metal", "cuda"])
@pytest.mark.parametrize("case", EXPERT_CASES, ids=lambda c: f"b{c[0]}d{c[1]}g{c[2]}{str(c[3]).split('.')[-1]}")
def test_expert_kernel_text_runs_right_on_cpu(kind, case):
    """Both kernels' generated text against MLX's gather matmuls: mixed bits, every group size, a token
    routed to experts another token also uses, router weights over three orders of magnitude."""
    bits, down_bits, gs, dtype = case
    mx.random.seed(bits * 10 + down_bits + gs)
    E, D, I = 7, 256, 128
    gate_up, down = doctor.random_banks(E, D, I, bits, gs, dtype, down_bits)
    x, idx, w = doctor.expert_inputs(E, D, N=2, P=4, dtype=dtype)
    x = x * 30  # activations far from unit size
    assert experts.kernel_fits(gate_up, down, 4)
    got = emulate_experts(kind, x, idx, w, gate_up, down)
    ref = experts.experts_ref(x.astype(mx.float32), idx, w, gate_up, down)
    tol = 1e-5 if dtype == mx.float32 else 2e-2  # the reference rounds gate, up and down outputs to bf16
    assert float(mx.abs(got - ref).max()) <= tol * float(mx.abs(ref).max())


def test_expert_kernels_take_only_banks_they_read():
    mx.random.seed(0)
    gate_up, down = doctor.random_banks(3, 128, 64, bits=4)
    assert experts.kernel_fits(gate_up, down, 9) and experts.kernel_fits(gate_up, down, 32)
    assert not experts.kernel_fits(gate_up, down, 33)  # more pairs a token than one threadgroup's groups
    _, three_bit = doctor.random_banks(3, 128, 64, bits=3)
    assert not experts.kernel_fits(gate_up, three_bit, 9)
    from kimi_mlx.model.moe import SwitchLinear

    assert not experts.kernel_fits(gate_up, SwitchLinear(3, 64, 128), 9)  # unquantized


def test_expert_path_policy(monkeypatch):
    from kimi_mlx.errors import ConfigError
    from kimi_mlx.model.fuse import EXPERTS_ENV, expert_path

    monkeypatch.delenv(EXPERTS_ENV, raising=False)
    on_gpu = experts_gpu()
    assert expert_path(9, 257, True) == ("kernel" if on_gpu else "gather")
    assert expert_path(9, 257, False) == "gather"
    monkeypatch.setenv(EXPERTS_ENV, "gather")
    assert expert_path(9, 257, True) == "gather"
    monkeypatch.setenv(EXPERTS_ENV, "kernel")
    with pytest.raises(ConfigError, match="KIMI_MLX_EXPERTS=kernel"):
        expert_path(9, 257, False)
    if on_gpu:
        assert expert_path(4096, 257, True) == "kernel"  # forced: any number of pairs
    else:
        with pytest.raises(ConfigError, match="KIMI_MLX_EXPERTS=kernel"):
            expert_path(9, 257, True)
    monkeypatch.delenv(EXPERTS_ENV)
    default_prefill = expert_path(4096, 257, True)
    for path in ("sorted", "segmented", "bounded"):  # prefill paths: calls of 64+ pairs only
        monkeypatch.setenv(EXPERTS_ENV, path)
        assert expert_path(64, 257, False) == path and expert_path(63, 257, False) == "gather"
    assert default_prefill == ("bounded" if mx.cuda.is_available() else "segmented" if mx.default_device() == mx.cpu
                               else "sorted")


def experts_gpu() -> bool:
    from kimi_mlx.ops.kda import gpu_backend

    return gpu_backend() is not None


@pytest.mark.gpu
@pytest.mark.parametrize("N", [1, 5])
@pytest.mark.parametrize("case", EXPERT_CASES, ids=lambda c: f"b{c[0]}d{c[1]}g{c[2]}{str(c[3]).split('.')[-1]}")
def test_expert_kernels_on_gpu(case, N):
    """The kernels at the real widths (D 2,304, I 1,024, 8 routed + 1 shared) against the gather matmuls."""
    bits, down_bits, gs, dtype = case
    mx.random.seed(N + bits)
    E, D, I = 20, 2304, 1024
    gate_up, down = doctor.random_banks(E, D, I, bits, gs, dtype, down_bits)
    x, idx, w = doctor.expert_inputs(E, D, N=N, P=9, dtype=dtype)
    ref = experts.experts_ref(x.astype(mx.float32), idx, w, gate_up, down)
    tol = 1e-5 if dtype == mx.float32 else 2e-2
    for path in ({}, {"wide": True}):
        got = experts.experts_kernel(x, idx, w, gate_up, down, **path)
        assert float(mx.abs(got - ref).max()) <= tol * float(mx.abs(ref).max()), path


@pytest.mark.gpu
def test_doctor_experts_check_on_gpu():
    assert doctor.check_experts().ok


# -- the router's float32 logits ------------------------------------------------------------------


@pytest.mark.skipif(not kernel_emulator.available(), reason="g++ is not installed")
@pytest.mark.parametrize("kind", ["metal", "cuda"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_router_kernel_text_runs_right_on_cpu(kind, dtype):
    """A row span not a multiple of 32 (200 over 8 groups: the lanes' last step is ragged), large activations."""
    rng = np.random.default_rng(7)
    N, D, E = 3, 200, 32
    x = mx.array(rng.standard_normal((N, D)).astype(np.float32) * 40).astype(dtype)
    weight = mx.array(rng.standard_normal((E, D)).astype(np.float32) * 0.05)
    S = group_rows(D, 8)
    (got,) = kernel_emulator.emulate("moe_router", kind, [x, weight], (("D", D), ("E", E), ("S", S)),
                                     grid=(32 * S, E, N), threadgroup=(32 * S, 1, 1), output_shapes=[(N, E)],
                                     output_dtypes=[mx.float32])
    ref = routing.logits_ref(x, weight)
    assert float(mx.abs(got - ref).max()) <= 1e-5 * float(mx.abs(ref).max())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_router_kernel_on_gpu(dtype):
    rng = np.random.default_rng(8)
    x = mx.array(rng.standard_normal((5, 2304)).astype(np.float32) * 3).astype(dtype)
    weight = mx.array(rng.standard_normal((256, 2304)).astype(np.float32) * 0.02)
    got, ref = routing.logits_kernel(x, weight), routing.logits_ref(x, weight)
    assert float(mx.abs(got - ref).max()) <= 1e-5 * float(mx.abs(ref).max())
    assert routing.router_logits(x, weight.astype(mx.bfloat16)).dtype == mx.float32  # a bf16 weight: the ops



def emulate_union(kind, x, idx, w, gate_up, down):
    """experts_kernel(union=True), its launches run by the emulator."""
    import metal_kernels

    real = metal_kernels.kernel
    metal_kernels.kernel = kernel_emulator.kernel_factory(kind)
    try:
        return experts.experts_kernel(x, idx, w, gate_up, down, union=True)
    finally:
        metal_kernels.kernel = real


@pytest.mark.skipif(not kernel_emulator.available(), reason="g++ is not installed")
@pytest.mark.parametrize("kind", ["metal", "cuda"])
@pytest.mark.parametrize("case", EXPERT_CASES[:2], ids=lambda c: f"b{c[0]}d{c[1]}g{c[2]}{str(c[3]).split('.')[-1]}")
def test_union_expert_kernel_text_runs_right_on_cpu(kind, case):
    """moe_gate_up_union (each expert of the tokens' union read once): equal to the per-pair kernel and to the
    gather matmuls for a batch whose tokens share experts: runs longer than one chunk of TB tokens, every token on
    the shared expert, a token alone on an expert."""
    bits, down_bits, gs, dtype = case
    mx.random.seed(7 + bits)
    E, D, I, N = 7, 256, 128, 6
    gate_up, down = doctor.random_banks(E, D, I, bits, gs, dtype, down_bits)
    x, _, w = doctor.expert_inputs(E, D, N=N, P=3, dtype=dtype)
    x = x * 30
    # expert 0 for every token (a run of 6 > TB = 4), expert 1 for five, the last column a shared expert (6)
    idx = mx.array([[0, 1, 6], [1, 0, 6], [0, 2, 6], [3, 0, 6], [0, 1, 6], [1, 0, 6]], mx.int32)
    got = emulate_union(kind, x, idx, w, gate_up, down)
    pairs = emulate_experts(kind, x, idx, w, gate_up, down)
    ref = experts.experts_ref(x.astype(mx.float32), idx, w, gate_up, down)
    tol = 1e-5 if dtype == mx.float32 else 2e-2
    assert float(mx.abs(got - pairs).max()) <= 1e-6 * float(mx.abs(pairs).max())
    assert float(mx.abs(got - ref).max()) <= tol * float(mx.abs(ref).max())



def emulate_kernel_path(kind, x, idx, w, gate_up, down, **path):
    """experts_kernel(**path), its launches run by the emulator."""
    import metal_kernels

    real = metal_kernels.kernel
    metal_kernels.kernel = kernel_emulator.kernel_factory(kind)
    try:
        return experts.experts_kernel(x, idx, w, gate_up, down, **path)
    finally:
        metal_kernels.kernel = real


WIDE_CASES = EXPERT_CASES + [
    (4, 4, 64, mx.bfloat16, 1152),  # 36 chunks a gate|up row: a lane's second chunk exists for 4 of the 32 lanes
    (2, 4, 32, mx.float32, 256),  # a 2-bit chunk (64 values) spans two groups of 32: the word-wise gate|up kernel
]


@pytest.mark.skipif(not kernel_emulator.available(), reason="g++ is not installed")
@pytest.mark.parametrize("kind", ["metal", "cuda"])
@pytest.mark.parametrize("case", WIDE_CASES, ids=lambda c: f"b{c[0]}d{c[1]}g{c[2]}{str(c[3]).split('.')[-1]}"
                         + (f"D{c[4]}" if len(c) > 4 else ""))
def test_wide_expert_kernels_text_runs_right_on_cpu(kind, case):
    """moe_gate_up_wide and moe_down_wide (16-byte loads, every load before the products): equal to the word-wise
    kernels to float rounding (their sums run in another order) and to the gather matmuls, with ragged chunks a
    lane and a bank they do not read (which takes the word-wise kernel)."""
    bits, down_bits, gs, dtype = case[:4]
    D = case[4] if len(case) > 4 else 256
    mx.random.seed(11 + bits + D)
    E, I = 7, 128
    gate_up, down = doctor.random_banks(E, D, I, bits, gs, dtype, down_bits)
    assert experts.wide_fits(gate_up) == (gs % (128 // bits) == 0) and experts.wide_fits(down)
    x, idx, w = doctor.expert_inputs(E, D, N=2, P=4, dtype=dtype)
    x = x * 30
    got = emulate_kernel_path(kind, x, idx, w, gate_up, down, wide=True)
    words = emulate_experts(kind, x, idx, w, gate_up, down)
    ref = experts.experts_ref(x.astype(mx.float32), idx, w, gate_up, down)
    tol = 1e-5 if dtype == mx.float32 else 2e-2
    assert float(mx.abs(got - words).max()) <= 1e-5 * float(mx.abs(words).max())
    assert float(mx.abs(got - ref).max()) <= tol * float(mx.abs(ref).max())


@pytest.mark.skipif(not kernel_emulator.available(), reason="g++ is not installed")
def test_wide_kernels_at_other_widths_on_cpu(monkeypatch):
    """moe_gate_up_wide at R = 1 and moe_down_wide at 16 output rows a threadgroup (benchmarks/experts_decode.py
    --wide-units 1/16 times them against the defaults)."""
    monkeypatch.setattr(experts, "WIDE_UNITS", 1)
    monkeypatch.setattr(experts, "WIDE_DOWN_UNITS", 16)
    mx.random.seed(5)
    E, D, I = 7, 1152, 128
    gate_up, down = doctor.random_banks(E, D, I, 4, 64, mx.float32, 4)
    x, idx, w = doctor.expert_inputs(E, D, N=2, P=4)
    got = emulate_kernel_path("cuda", x, idx, w, gate_up, down, wide=True)
    ref = experts.experts_ref(x, idx, w, gate_up, down)
    assert float(mx.abs(got - ref).max()) <= 1e-5 * float(mx.abs(ref).max())
