"""Every Triton kernel, with every config and dtype it ships, compiles for the GPU targets as a real
launch specializes it, and each tile list starts with a config that runs everywhere.

The interpreter runs the tests on the CPU but accepts code a GPU compile rejects, so each kernel
module's ``compile_specs()`` is compiled here for real targets, with no GPU (DESIGN.md §4), with
the specialization Triton's launcher derives from a B=4 H=16 N=4096 launch. Every config must
fit the target's shared memory and registers (sm_80 and sm_90); the first config of each tile list
(kernel, dtype and precision, head-dim width: the split widths 48, 96 and 192 of the attention
kernels have lists of their own), the only one that runs with autotuning off, must also be
free of register spills and fit the 99 KB of sm_86/sm_89 (RTX 30/40, A10, L4), and is compiled for
sm_86 too. The full matrix (every target, the odd-length specialization, SASS counts) is the census:
``python -m benchmarks.ptxas_census``.
"""

import importlib

import pytest

import tangent_kernels.triton as triton_package
from helpers import compile_for_gpu_targets
from tangent_kernels.triton import SHARED_MEMORY_PER_BLOCK
from tangent_kernels.triton.compile_check import kernel_modules, tile_list

KERNEL_MODULES = kernel_modules()

# Tile lists whose first config cannot be spill-free or within 99 KB, each with what happens
# instead (the config comments in the kernel modules give the census's numbers).
EXCEPTIONS = {
    ("tangent_kernels.triton.attention", "fwd fp32-ieee D=256"): "the least spilling tile, 16×16",
    ("tangent_kernels.triton.attention_second_order", "dq fp32-ieee D=128"): "the least spilling tile, 16×16",
    ("tangent_kernels.triton.attention_second_order", "dkdv fp32-ieee D=128"): "the least spilling tile, 16×16",
    ("tangent_kernels.triton.attention_second_order", "dkdv fp32-tf32 D=128"): "112 KB: torch ops serve on sm_86/89",
    # One row of 16384 features in registers: at 16 warps a thread gets 128 registers (64K per block),
    # and 8 to 316 bytes spill (32 warps spill too); wider rows need the split-row kernel.
    **{("tangent_kernels.triton.layer_norm", f"{kind} torch.{dtype} BLOCK_N=16384"): "the widest row"
       for kind in ("fwd", "bwd") for dtype in ("float16", "bfloat16", "float32")},
}


def test_every_kernel_module_lists_its_specs():
    assert KERNEL_MODULES, "no Triton kernel modules found"
    if not triton_package.AVAILABLE:
        pytest.skip(triton_package.UNAVAILABLE_REASON)
    for module in KERNEL_MODULES:
        assert hasattr(importlib.import_module(module), "compile_specs"), f"{module} has no compile_specs()"


def _first_config_problems(results, module) -> dict:
    """``{(module, tile list): [problem, ...]}`` for the first configs that spill or exceed the
    shared memory of sm_86 (sm_90's own limit is checked with every config)."""
    firsts, problems = {}, {}
    for r in results:
        firsts.setdefault(tile_list(r["spec"]), r["spec"])
    for r in results:
        if firsts[tile_list(r["spec"])] != r["spec"]:
            continue
        found = problems.setdefault((module, tile_list(r["spec"])), [])
        if r["spill_bytes"]:
            found.append(f"{r['target']}: {r['spill_bytes']} bytes of spills")
        if r["target"] != "sm_90" and r["shared"] > SHARED_MEMORY_PER_BLOCK[86]:
            found.append(f"{r['target']}: {r['shared']} bytes of shared memory")
    return {key: found for key, found in problems.items() if found}


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_compiles_for_sm80_and_sm90(module):
    """Every config fits sm_80 and sm_90; the first of each tile list is spill-free and within the
    shared memory of sm_86/89 (which compile as sm_80 does but allow 99 KB)."""
    if not triton_package.AVAILABLE:
        pytest.skip(triton_package.UNAVAILABLE_REASON)
    results = compile_for_gpu_targets(module, "--registers", "--targets", "80,90", "--specializations", "aligned")
    failures = [r for r in results if not r["ok"]]
    assert not failures, "\n".join(str(f) for f in failures[:10])
    assert {r["target"] for r in results} == {"sm_80", "sm_90"}
    assert all(0 < r["registers"] <= 255 for r in results)
    problems = _first_config_problems(results, module)
    assert problems.keys() == {key for key in EXCEPTIONS if key[0] == module}, problems


@pytest.mark.parametrize("module", [m for m in KERNEL_MODULES if "attention" in m])
def test_first_configs_on_sm86(module):
    """The tiled attention kernels' first configs, compiled for sm_86 itself: ptxas allocates
    registers there differently from sm_80 (configs spill-free on sm_80 spilled 4-56 bytes there).
    sm_89 compiles exactly as sm_86 (the census: the same registers, spills, shared memory and SASS
    for every first config), so it is left to the census to keep this test within about a minute."""
    if not triton_package.AVAILABLE:
        pytest.skip(triton_package.UNAVAILABLE_REASON)
    results = compile_for_gpu_targets(module, "--registers", "--first", "--targets", "86", "--specializations",
                                      "aligned")  # fmt: skip
    failures = [r for r in results if not r["ok"] and (module, tile_list(r["spec"])) not in EXCEPTIONS]
    assert not failures, "\n".join(str(f) for f in failures[:10])
    problems = _first_config_problems(results, module)
    assert problems.keys() <= EXCEPTIONS.keys(), problems
