"""kimi-mlx doctor's kernel checks with every launch run by the emulator on the Metal text: what the doctor runs on
a Mac (the checks, the ops wrappers' arguments, templates and grids, the kernels), here on the CPU. The CUDA text
runs the same checks on the device (test_kda, test_moe, test_norm, test_attention GPU tests)."""

import pytest

import kernel_emulator
import metal_kernels
from kimi_mlx import doctor


@pytest.mark.skipif(not kernel_emulator.available(), reason="g++ is not installed")
@pytest.mark.parametrize("name", list(doctor.GPU_CHECKS))
def test_doctor_check_passes_on_the_emulated_metal_text(name, monkeypatch):
    monkeypatch.setattr(metal_kernels, "kernel", kernel_emulator.kernel_factory("metal"))
    check = doctor.GPU_CHECKS[name]()
    assert check.ok, check
