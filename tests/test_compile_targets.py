"""Every Triton kernel, with every config and dtype it ships, compiles for sm_80 and sm_90.

The interpreter runs the tests on the CPU but accepts code a GPU compile rejects, so each kernel
module's ``compile_specs()`` is compiled here for real targets, with no GPU (DESIGN.md §4), and
its shared memory must fit one block of the target.
"""

import importlib
import re

import pytest

import tangent_kernels.triton as triton_package
from tangent_kernels.triton import SHARED_MEMORY_PER_BLOCK
from helpers import compile_for_gpu_targets
from tangent_kernels.triton.compile_check import kernel_modules

KERNEL_MODULES = kernel_modules()


def test_every_kernel_module_lists_its_specs():
    assert KERNEL_MODULES, "no Triton kernel modules found"
    if not triton_package.AVAILABLE:
        pytest.skip(triton_package.UNAVAILABLE_REASON)
    for module in KERNEL_MODULES:
        assert hasattr(importlib.import_module(module), "compile_specs"), f"{module} has no compile_specs()"


# Tile lists with no config that fits sm_86/89, each with what happens there instead.
TOO_BIG_FOR_SM86 = {
    ("tangent_kernels.triton.attention_second_order", "dkdv fp32-tf32 D=128"): "OutOfResources: torch ops serve",
}


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_compiles_for_sm80_and_sm90(module):
    """And every tile list (kernel, dtype and precision, head dim) holds a config within the 99 KB
    of shared memory of sm_86/89 (RTX 30/40, A10, L4), which compile as sm_80 does: the autotuner
    skips the configs that do not fit there, so it needs one that does."""
    if not triton_package.AVAILABLE:
        pytest.skip(triton_package.UNAVAILABLE_REASON)
    results = compile_for_gpu_targets(module)
    failures = [r for r in results if not r["ok"]]
    assert not failures, "\n".join(str(f) for f in failures[:10])
    assert {r["target"] for r in results} == {"sm_80", "sm_90"}
    smallest = {}
    for r in results:
        tile_list = re.match(r"(.* D=\d+) M=", r["spec"])
        if r["target"] == "sm_80" and tile_list:
            key = (module, tile_list.group(1))
            smallest[key] = min(smallest.get(key, r["shared"]), r["shared"])
    too_big = {key for key, shared in smallest.items() if shared > SHARED_MEMORY_PER_BLOCK[86]}
    assert too_big == {key for key in TOO_BIG_FOR_SM86 if key[0] == module}, sorted(too_big)


def test_register_census():
    """``--registers`` adds ptxas's counts (how the IEEE fp32 attention tiles were chosen)."""
    if not triton_package.AVAILABLE:
        pytest.skip(triton_package.UNAVAILABLE_REASON)
    results = compile_for_gpu_targets("tangent_kernels.triton.gelu", "--registers")
    assert all(r["ok"] and 0 < r["registers"] <= 255 and r["spill_bytes"] >= 0 for r in results), results[:2]
