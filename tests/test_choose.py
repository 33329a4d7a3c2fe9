"""Each op's path choice as a pure function of settings.Facts (switches, backend, kernels switched off) and the
call's shapes: tables of cases, no environment and no monkeypatching."""

import pytest

from kimi_mlx.errors import ConfigError
from kimi_mlx.model.fuse import choose_experts
from kimi_mlx.ops import routing
from kimi_mlx.ops.kda import choose_intra, choose_prefill, choose_scan
from kimi_mlx.ops.kda_decode import choose_decode, choose_rows
from kimi_mlx.settings import Facts

CPU = Facts()
METAL = Facts(gpu="metal", cpu=False)
CUDA = Facts(gpu="cuda", cpu=False, cuda=True)


def with_(f: Facts, **switches) -> Facts:
    return Facts(switches, f.gpu, f.off, f.cpu, f.cuda)


def off(f: Facts, *kernels) -> Facts:
    return Facts(f.switches, f.gpu, frozenset(kernels), f.cpu, f.cuda)


@pytest.mark.parametrize("facts, T, dk, want", [
    (CPU, 1, 128, "ref"), (CPU, 15, 128, "ref"), (CPU, 4096, 128, "chunked"),
    (METAL, 4096, 128, "kernel"), (CUDA, 4096, 128, "kernel"), (CUDA, 4096, 48, "chunked"),
    (off(CUDA, "kda_intra_chunk"), 4096, 128, "chunked"), (off(CUDA, "kda_intra_chunk_mma"), 4096, 128, "kernel"),
    (off(with_(CUDA, KIMI_MLX_KDA_INTRA="mma"), "kda_intra_chunk"), 4096, 128, "kernel"),
    (off(with_(CUDA, KIMI_MLX_KDA_INTRA="mma"), "kda_intra_chunk_mma"), 4096, 128, "kernel"),
    (off(with_(CUDA, KIMI_MLX_KDA_INTRA="mma"), "kda_intra_chunk", "kda_intra_chunk_mma"), 4096, 128, "chunked"),
    (with_(CUDA, KIMI_MLX_KDA="ref"), 4096, 128, "ref"), (with_(CPU, KIMI_MLX_KDA="chunked"), 2, 128, "chunked"),
    (with_(METAL, KIMI_MLX_KDA="kernel"), 2, 128, "kernel"),
])
def test_kda_prefill(facts, T, dk, want):
    assert choose_prefill(facts, T, dk) == want


def test_kda_kernel_mode_needs_a_gpu():
    with pytest.raises(ConfigError, match="Metal or CUDA"):
        choose_prefill(with_(CPU, KIMI_MLX_KDA="kernel"), 4096)


@pytest.mark.parametrize("facts, path, want", [
    (CUDA, "kernel", "affine"), (METAL, "kernel", "kernel"), (off(METAL, "kda_chunk_scan"), "kernel", "affine"),
    (CPU, "chunked", "ops"), (with_(METAL, KIMI_MLX_KDA_SCAN="ops"), "kernel", "ops"),
    (with_(CUDA, KIMI_MLX_KDA_SCAN="doubling"), "kernel", "doubling"), (with_(CUDA, KIMI_MLX_KDA_SCAN="mma"), "kernel", "mma"),
    (off(with_(CUDA, KIMI_MLX_KDA_SCAN="mma"), "kda_scan_mma"), "kernel", "affine"),
    (with_(CPU, KIMI_MLX_KDA_SCAN="doubling"), "chunked", "doubling"),
])
def test_kda_scan(facts, path, want):
    assert choose_scan(facts, path) == want


def test_kda_scan_kernels_need_the_kernel_path():
    for scan in ("kernel", "mma"):
        with pytest.raises(ConfigError, match=f"KIMI_MLX_KDA_SCAN={scan} needs"):
            choose_scan(with_(CPU, KIMI_MLX_KDA_SCAN=scan), "chunked")


@pytest.mark.parametrize("facts, want", [
    (CUDA, "kernel"), (METAL, "kernel"), (off(CUDA, "kda_intra_chunk"), "kernel"),
    (with_(CUDA, KIMI_MLX_KDA_INTRA="mma"), "mma"), (with_(METAL, KIMI_MLX_KDA_INTRA="mma"), "mma"),
    (off(with_(CUDA, KIMI_MLX_KDA_INTRA="mma"), "kda_intra_chunk_mma"), "kernel"),
])
def test_kda_intra(facts, want):
    assert choose_intra(facts) == want


@pytest.mark.parametrize("facts, shape, taps, want", [
    (CPU, (1, 32, 128, 128), 4, "ops"), (METAL, (1, 32, 128, 128), 4, "kernel"), (CUDA, (1, 2, 16, 48), 4, "ops"),
    (CUDA, (1, 32, 128, 128), 1, "ops"), (with_(CUDA, KIMI_MLX_KDA="ref"), (1, 32, 128, 128), 4, "ref"),
])
def test_kda_decode(facts, shape, taps, want):
    assert choose_decode(facts, shape, taps) == want


ROWS_ON, ROWS_OFF = {"KIMI_MLX_KDA_ROWS": "on"}, {"KIMI_MLX_KDA_ROWS": "off"}


@pytest.mark.parametrize("facts, shape, taps, tokens, want", [
    (CUDA, (1, 32, 128, 128), 4, 3, "steps"), (CUDA, (1, 32, 128, 128), 4, 5, "rows"),
    (METAL, (1, 32, 128, 128), 4, 9, "rows"), (CPU, (1, 32, 128, 128), 4, 9, "steps"),
    (with_(CUDA, **ROWS_ON), (1, 32, 128, 128), 4, 2, "rows"), (with_(CUDA, **ROWS_OFF), (1, 32, 128, 128), 4, 9, "steps"),
    (with_(METAL, **ROWS_ON), (1, 32, 128, 128), 4, 2, "rows"), (with_(CPU, **ROWS_ON), (1, 32, 128, 128), 4, 9, "steps"),
    (off(with_(CUDA, **ROWS_ON), "kda_decode_rows"), (1, 32, 128, 128), 4, 9, "steps"),
    (with_(CUDA, **ROWS_ON), (1, 32, 128, 100), 4, 9, "steps"), (with_(CUDA, **ROWS_ON), (1, 32, 128, 128), 1, 9, "steps"),
])
def test_kda_verification_rows(facts, shape, taps, tokens, want):
    """auto (the default): the one kernel from ROWS_FROM tokens; on: every width; off or no kernel: steps."""
    assert choose_rows(facts, shape, taps, tokens) == want


@pytest.mark.parametrize("facts, E, want", [
    (CPU, 256, "ref"), (CUDA, 256, "kernel"), (CUDA, 48, "ref"), (off(CUDA, "moe_route"), 256, "ref"),
    (with_(METAL, KIMI_MLX_ROUTE="ref"), 256, "ref"),
])
def test_routing(facts, E, want):
    assert routing.choose(facts, E, 8, 1) == want


@pytest.mark.parametrize("facts, pairs, fits, want", [
    (CPU, 9, True, "gather"), (CUDA, 9, True, "kernel"), (CUDA, 9, False, "gather"),
    (CPU, 2048 * 9, True, "segmented"), (CUDA, 2048 * 9, True, "bounded"), (METAL, 2048 * 9, True, "sorted"),
    (with_(CUDA, KIMI_MLX_EXPERTS="gather"), 2048 * 9, True, "gather"),
    (with_(CUDA, KIMI_MLX_EXPERTS="sorted"), 9, True, "kernel"),  # a prefill path is never forced on a decode call
    (with_(CUDA, KIMI_MLX_EXPERTS="union"), 9, True, "union"),
    (with_(CUDA, KIMI_MLX_EXPERTS="union"), 2048 * 9, True, "bounded"),  # union is a decode path: prefill keeps its own
    (with_(METAL, KIMI_MLX_EXPERTS="union"), 2048 * 9, True, "sorted"),
    (with_(CUDA, KIMI_MLX_EXPERTS="wide"), 9, True, "wide"),
    (with_(CUDA, KIMI_MLX_EXPERTS="wide"), 2048 * 9, True, "bounded"),  # a decode path too
])
def test_experts(facts, pairs, fits, want):
    assert choose_experts(facts, pairs, fits) == want


@pytest.mark.parametrize("facts, pairs, fits, want", [
    (CPU, 16 * 9, True, "gather"), (CUDA, 16 * 9, True, "kernel"), (CUDA, 16 * 9, False, "gather"),
    (METAL, 8 * 9, True, "kernel"), (with_(CUDA, KIMI_MLX_EXPERTS="bounded"), 16 * 9, True, "kernel"),
    (with_(CPU, KIMI_MLX_EXPERTS="segmented"), 16 * 9, True, "gather"),
    (with_(CUDA, KIMI_MLX_EXPERTS="gather"), 16 * 9, True, "gather"),
    (CUDA, 16 * 9, True, "kernel"),  # union only when forced (unmeasured: not a default)
    (with_(CUDA, KIMI_MLX_EXPERTS="union"), 16 * 9, True, "union"),
    (with_(METAL, KIMI_MLX_EXPERTS="union"), 9, True, "union"),
    (off(with_(CUDA, KIMI_MLX_EXPERTS="union"), "moe_gate_up_union"), 16 * 9, True, "kernel"),
    (with_(CUDA, KIMI_MLX_EXPERTS="wide"), 16 * 9, True, "wide"),  # wide only when forced (untimed)
    (with_(METAL, KIMI_MLX_EXPERTS="wide"), 9, True, "wide"),
    (off(with_(CUDA, KIMI_MLX_EXPERTS="wide"), "moe_down_wide"), 16 * 9, True, "kernel"),
])
def test_experts_of_a_batched_decode_step(facts, pairs, fits, want):
    """A decode step of B sequences (B * k pairs, past 64) keeps the decode paths: no sorting, nothing read back."""
    assert choose_experts(facts, pairs, fits, decode=True) == want


def test_forcing_the_expert_kernels_where_they_cannot_run_is_one_line():
    with pytest.raises(ConfigError, match="KIMI_MLX_EXPERTS=kernel needs"):
        choose_experts(with_(CPU, KIMI_MLX_EXPERTS="kernel"), 9, True)
    with pytest.raises(ConfigError, match="KIMI_MLX_EXPERTS=union needs"):
        choose_experts(with_(CUDA, KIMI_MLX_EXPERTS="union"), 9, False)
    with pytest.raises(ConfigError, match="KIMI_MLX_EXPERTS=wide needs"):
        choose_experts(with_(CPU, KIMI_MLX_EXPERTS="wide"), 9, True)


def test_the_small_kernels():
    from kimi_mlx.ops import attention, kda, linear, norm

    assert norm.choose(CUDA, 2304, 1, True) == "kernel" and norm.choose(CPU, 2304, 1, True) == "ref"
    assert norm.choose(CUDA, 2304, 2048, True) == "ref"  # prefill rows: the ops
    assert norm.choose(off(METAL, "add_norm"), 2304, 1, True) == "ref"
    assert kda.choose_gated_norm(METAL, 128) == "kernel" and kda.choose_gated_norm(METAL, 48) == "ref"
    assert kda.choose_gated_norm(with_(METAL, KIMI_MLX_KDA="chunked"), 128) == "ref"
    assert routing.choose_logits(CUDA, 1, True) == "kernel" and routing.choose_logits(CUDA, 1, False) == "ref"
    assert routing.choose_logits(CUDA, 4096, True) == "ref"
    assert attention.choose_cache_rows(CUDA, 512) == "kernel" and attention.choose_cache_rows(CUDA, 20) == "ref"
    assert linear.choose(CUDA, 2048) == "dequant" and linear.choose(METAL, 2048) == "quantized"
    assert linear.choose(CUDA, 1) == "quantized" and linear.choose(with_(CPU, KIMI_MLX_DEQUANT="on"), 2048) == "dequant"


@pytest.mark.parametrize("facts, rows, nbytes, want", [
    (CUDA, 2, 212_000_000, 8), (CUDA, 7, 212_000_000, 8),  # lm_head: from 2 rows
    (CUDA, 2, 16_000_000, 8), (CUDA, 3, 16_000_000, 8), (CUDA, 2, 8_000_000, 2), (CUDA, 3, 8_000_000, 8),
    (CUDA, 6, 1_300_000, 6),  # a small weight: the mat-vecs read less than the GEMM costs
    (CUDA, 1, 212_000_000, 1), (CUDA, 8, 212_000_000, 8), (CUDA, 16, 212_000_000, 16),
    (METAL, 4, 212_000_000, 4), (CPU, 4, 212_000_000, 4),
    (with_(CUDA, KIMI_MLX_PAD_ROWS="off"), 4, 212_000_000, 4),
])
def test_padded_rows(facts, rows, nbytes, want):
    from kimi_mlx.ops.linear import padded_rows

    assert padded_rows(facts, rows, nbytes) == want


@pytest.mark.parametrize("facts, rows, quantized, want", [
    (CUDA, (1024,), False, "page"), (CUDA, (16384,), False, "split"), (CUDA, (131072, 16384), False, "split"),
    (CUDA, (1024,), True, "matmuls"), (CPU, (1024,), False, "matmuls"),
    (off(CUDA, "mla_decode_page"), (1024,), False, "split"), (off(CUDA, "mla_decode_merge"), (1024,), False, "matmuls"),
    (with_(CUDA, KIMI_MLX_MLA_PAGE="off"), (1024,), False, "matmuls"),
])
def test_mla_decode(facts, rows, quantized, want):
    from kimi_mlx.ops import mla_decode

    assert mla_decode.choose(facts, 32, 576, rows, quantized, True) == want


def test_mla_prefill():
    from kimi_mlx.ops import attention

    small, big = 1 << 20, attention.TILE_BYTES + 1
    assert attention.choose(CPU, small, False, 1, False) == "fused"
    assert attention.choose(CPU, small, True, 1, False) == "tiled"  # the absorbed form never takes SDPA
    assert attention.choose(CPU, big, False, 1, False) == "tiled"
    assert attention.choose(CPU, small, False, 2, False) == "tiled" and attention.choose(CPU, small, False, 1, True) == "tiled"
    assert attention.choose(with_(CPU, KIMI_MLX_MLA="ref"), small, False, 1, False) == "ref"
