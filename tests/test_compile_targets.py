"""Every Triton kernel, with every config and dtype it ships, compiles for sm_80 and sm_90.

The interpreter runs the tests on the CPU but accepts code a GPU compile rejects, so each kernel
module's ``compile_specs()`` is compiled here for real targets, with no GPU (DESIGN.md §4), and
its shared memory must fit one block of the target.
"""

import importlib

import pytest

import tangent_kernels.triton as triton_package
from helpers import compile_for_gpu_targets
from tangent_kernels.triton.compile_check import kernel_modules

KERNEL_MODULES = kernel_modules()


def test_every_kernel_module_lists_its_specs():
    assert KERNEL_MODULES, "no Triton kernel modules found"
    if not triton_package.AVAILABLE:
        pytest.skip(triton_package.UNAVAILABLE_REASON)
    for module in KERNEL_MODULES:
        assert hasattr(importlib.import_module(module), "compile_specs"), f"{module} has no compile_specs()"


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_compiles_for_sm80_and_sm90(module):
    if not triton_package.AVAILABLE:
        pytest.skip(triton_package.UNAVAILABLE_REASON)
    results = compile_for_gpu_targets(module)
    failures = [r for r in results if not r["ok"]]
    assert not failures, "\n".join(str(f) for f in failures[:10])
    assert {r["target"] for r in results} == {"sm_80", "sm_90"}


def test_register_census():
    """``--registers`` adds ptxas's counts (how the IEEE fp32 attention tiles were chosen)."""
    if not triton_package.AVAILABLE:
        pytest.skip(triton_package.UNAVAILABLE_REASON)
    results = compile_for_gpu_targets("tangent_kernels.triton.gelu", "--registers")
    assert all(r["ok"] and 0 < r["registers"] <= 255 and r["spill_bytes"] >= 0 for r in results), results[:2]
