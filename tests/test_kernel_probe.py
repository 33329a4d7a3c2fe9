"""Every kernel the loaded model launches is built and run once at load (Model.probe_kernels); one that fails is
switched off, said in one line on stderr, and its path falls back to the next one down, so generation still gives
the reference output. On the CPU the kernels run as their Metal text in the emulator (tests/kernel_emulator.py),
with the model's layers taking their GPU paths: a tiny 8-bit checkpoint whose layers take every kernel."""

import functools

import mlx.core as mx
import mlx.nn as nn
import pytest

import kernel_emulator
import metal_kernels
from kimi_mlx.model import fuse
from kimi_mlx.ops import kda as kda_ops

pytestmark = pytest.mark.skipif(not kernel_emulator.available(), reason="g++ is not installed")

INJECTED = "Unable to build metal library from source: error: injected build failure"
PROMPT = [5, 17, 42, 9, 100, 3]
TOKENS = 3
# one KDA layer (dense FFN) and one MLA layer (MoE of 32 experts: the routing kernel takes it), widths the kernels
# take (KDA head dim and latent rank multiples of 32, MLA heads a multiple of the page kernel's 8)
SHAPE = dict(layers="km", kda_dim=32, hidden_size=64, moe_intermediate_size=32, num_local_experts=32,
             intermediate_size=64, num_attention_heads=8, num_key_value_heads=8, kv_lora_rank=32, v_head_dim=16)


def greedy(model) -> list[int]:
    """TOKENS greedy tokens after PROMPT, one decode step at a time."""
    state = model.new_state(1)
    y = int(mx.argmax(model(mx.array([PROMPT]), state)[0, -1]))
    out = [y]
    for _ in range(TOKENS - 1):
        y = int(mx.argmax(model(mx.array([[y]]), state)[0, -1]))
        out.append(y)
    return out


def build(path):
    """The tiny checkpoint at 8 bits, fused as load fuses it: expert banks and the KDA gates kernel's inputs."""
    from kimi_mlx import load_model
    from kimi_mlx.model.fuse import fuse_model

    model = load_model(path, fuse=False)
    nn.quantize(model, group_size=32, bits=8, class_predicate=lambda _, m: hasattr(m, "to_quantized"))
    fuse_model(model)
    model.eager_steps = True  # the emulator reads its inputs: no launch inside a compiled graph
    model.compile_prefill = False
    return model


@pytest.fixture(scope="module")
def checkpoint(hf_checkpoint):
    return hf_checkpoint(**SHAPE)[1]


@pytest.fixture(scope="module")
def reference(checkpoint) -> list[int]:
    """The greedy tokens on the CPU paths (no kernel anywhere)."""
    return greedy(build(checkpoint))


class EmulatedGPU:
    """The layers take their GPU paths, each kernel launch runs its Metal text in the emulator; `failing` kernels
    raise as a kernel that does not build does."""

    def __init__(self, monkeypatch, failing=(), error=RuntimeError(INJECTED)):
        self.failing, self.error, self.launched, self.sizes = set(failing), error, [], []
        monkeypatch.setattr(kda_ops, "gpu_backend", lambda: "metal")
        monkeypatch.setattr(fuse, "gpu_backend", lambda: "metal")
        monkeypatch.setattr(metal_kernels, "_off", {})
        monkeypatch.setattr(metal_kernels, "kernel", self.kernel)

    def kernel(self, name):
        emulated = kernel_emulator.emulated_kernel("metal", name)

        def run(**kw):
            self.launched.append(name)
            self.sizes.append((name, tuple(a.size for a in kw["inputs"])))
            if name in self.failing:
                raise self.error
            return emulated(**kw)
        return functools.partial(metal_kernels.launch, name, run)

    def load(self, path):
        """The model, probed as load probes it (weights/load.check_kernels)."""
        from kimi_mlx.weights.load import check_kernels

        model = build(path)
        check_kernels(model)
        return model


@pytest.fixture(scope="module")
def probed_kernels(checkpoint, reference):
    """The kernels the probe launches when none fails."""
    with pytest.MonkeyPatch.context() as mp:
        gpu = EmulatedGPU(mp)
        gpu.load(checkpoint)
        return sorted(set(gpu.launched))


def test_the_probe_runs_every_kernel_the_model_launches(checkpoint, probed_kernels, reference, monkeypatch,
                                                        capsys):
    """The probes launch every kernel a decode and a prefill take (kda_decode
    at load_model's probe, before the test quantizes the f_b and g_b projections the gates kernel reads); a
    generation after them launches no kernel they did not build."""
    assert set(probed_kernels) == {"kda_decode", "kda_decode_gates", "kda_decode_rows", "kda_intra_chunk",
                                   "kda_chunk_scan", "kda_gated_norm",
                                   "add_norm", "mla_cache_row", "mla_decode_page", "mla_decode_merge",
                                   "mla_decode_chunks", "moe_router", "moe_route", "moe_gate_up", "moe_down"}
    gpu = EmulatedGPU(monkeypatch)
    model = gpu.load(checkpoint)
    assert metal_kernels.switched_off() == {} and "kimi-mlx:" not in capsys.readouterr().err
    gpu.launched.clear()
    assert greedy(model) == reference
    assert set(gpu.launched) <= set(probed_kernels)


def test_the_probe_builds_the_mla_decode_kernels_for_one_sequence_and_for_a_batch(checkpoint, monkeypatch):
    """A batch's per-sequence `last` reaches Metal in device memory from 8 sequences up (fewer elements: the constant
    address space), another build of each MLA decode kernel: the probe runs both, so a batch never launches a
    kernel the load did not build."""
    gpu = EmulatedGPU(monkeypatch)
    gpu.load(checkpoint)
    for name in ("mla_decode_page", "mla_decode_chunks"):
        at = metal_kernels.SPECS[name].inputs.index("last")
        lasts = {sizes[at] for n, sizes in gpu.sizes if n == name}
        assert min(lasts) < 8 <= max(lasts), (name, lasts)


@pytest.mark.parametrize("name", sorted(metal_kernels.SPECS))
def test_a_kernel_that_fails_to_build_is_switched_off_and_generation_still_matches(name, checkpoint, probed_kernels,
                                                                                   reference, monkeypatch, capsys):
    if name not in probed_kernels:
        pytest.skip(f"the model never launches {name} (an opt-in path)")
    gpu = EmulatedGPU(monkeypatch, failing={name})
    model = gpu.load(checkpoint)
    err = capsys.readouterr().err.strip().splitlines()
    assert metal_kernels.switched_off() == {name: INJECTED}
    assert len(err) == 1 and err[0].startswith("kimi-mlx: a GPU kernel failed") and err[0].endswith(
        f"{name}: {INJECTED}")
    gpu.launched.clear()
    assert greedy(model) == reference
    assert name not in gpu.launched
    if name == "kda_decode_gates":  # the next path down is the KDA kernel without the gate projections
        assert "kda_decode" in gpu.launched


def test_a_threadgroup_the_gpu_refuses_is_switched_off(checkpoint, probed_kernels, reference, monkeypatch, capsys):
    """MLX raises ValueError where a Metal pipeline allows fewer threads a threadgroup than the kernel asks for."""
    refused = "Thread group size (512) is greater than  the maximum allowed threads per threadgroup (448)."
    gpu = EmulatedGPU(monkeypatch, failing={"kda_decode_gates"}, error=ValueError(refused))
    model = gpu.load(checkpoint)
    assert metal_kernels.switched_off() == {"kda_decode_gates": refused}
    assert capsys.readouterr().err.strip().endswith(f"kda_decode_gates: {refused}")
    gpu.launched.clear()
    assert greedy(model) == reference
    assert "kda_decode_gates" not in gpu.launched and "kda_decode" in gpu.launched


def test_every_kernel_failing_leaves_the_ops_paths(checkpoint, probed_kernels, reference, monkeypatch, capsys):
    gpu = EmulatedGPU(monkeypatch, failing=set(metal_kernels.SPECS))
    model = gpu.load(checkpoint)
    off = metal_kernels.switched_off()
    assert set(off) == set(gpu.launched)  # each kernel tried failed (a path whose first kernel failed tries no more)
    assert {"kda_decode", "kda_decode_gates", "kda_intra_chunk", "moe_gate_up", "mla_decode_page"} <= set(off)
    assert len(capsys.readouterr().err.strip().splitlines()) == len(off)
    gpu.launched.clear()
    assert greedy(model) == reference
    assert gpu.launched == []


def test_a_0d_input_is_refused_at_the_launch():
    """MLX would pass it by reference in Metal (`const constant float& eps`), which `eps[0]` cannot index."""
    with pytest.raises(ValueError, match="input 'eps' is 0-d"):
        metal_kernels.launch("add_norm", lambda **kw: None, [mx.zeros((1, 64)), mx.zeros((1, 64)), mx.ones((64,)),
                                                              mx.array(1e-6)])


def test_the_verification_kernel_is_probed_where_switched_on_and_falls_back(checkpoint, reference, monkeypatch,
                                                                           capsys):
    """KIMI_MLX_KDA_ROWS=auto (the default): the probe also runs a speculative verification wide enough to take
    kda_decode_rows, so it is built at load; where it fails it is switched off (one line) and a speculative run's
    tokens are still the reference's."""
    from kimi_mlx import settings
    from kimi_mlx.generate import GenerationOptions, Generation
    from kimi_mlx.speculate import NgramDraft, SpecStats

    class Repeat(NgramDraft):  # drafts every round, so each round verifies
        def propose(self, k):
            return [3] * k

    for failing in ((), ("kda_decode_rows",)):
        with settings.override(KIMI_MLX_KDA_ROWS="auto"):
            gpu = EmulatedGPU(monkeypatch, failing=failing)
            model = gpu.load(checkpoint)
        assert "kda_decode_rows" in gpu.launched
        assert set(metal_kernels.switched_off()) == set(failing)
        gpu.launched.clear()
        with settings.override(KIMI_MLX_KDA_ROWS="on"):  # (this reply's rounds verify 2 tokens: below auto's width)
            gen = Generation(model, _Tok(), model.new_state(1), PROMPT, GenerationOptions(max_tokens=TOKENS,
                                                                                        temperature=0))
            gen.draft, gen.spec = Repeat(num_draft=2), SpecStats()
            assert [r.token for r in gen] == reference and gen.spec.drafted > 0
        assert ("kda_decode_rows" in gpu.launched) == (not failing)
    capsys.readouterr()


class _Tok:
    """Just what Generation asks of a tokenizer."""

    im_end_id, eos_id = -1, -2

    def detokenizer(self):
        class D:
            def add(self, t):
                return ""

            def finalize(self):
                return ""
        return D()
