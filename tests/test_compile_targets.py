"""Every Triton kernel, with every config and dtype it ships, compiles for the GPU targets as a real
launch specializes it, and each tile list starts with a config that runs everywhere.

The interpreter runs the tests on the CPU but accepts code a GPU compile rejects, so each kernel
module's ``compile_specs()`` is compiled for real targets, with no GPU (DESIGN.md §4), with the
specialization Triton's launcher derives from a B=4 H=16 N=4096 launch. Every config must fit the
target's shared memory and registers (sm_80 and sm_90); the first config of each tile list
(kernel, dtype and precision, head-dim width: the split widths 48, 96 and 192 of the attention
kernels have lists of their own), the only one that runs with autotuning off, must also be free of
register spills and fit the 99 KB of sm_86/sm_89 (RTX 30/40, A10, L4), compiled for sm_86 and
sm_89 too, and so again as launched over an odd length (N=197, ViT's tokens: lengths and strides
not divisible by 16, so narrower loads) on sm_80, sm_86, sm_89 and sm_90.

Compiling all of that takes about an hour of CPU time, so it is kept in ``tests/compile_record.json``
(``make compile-record`` rewrites it after a kernel change): these tests check that the record is
of the current kernel sources and Triton, covers every spec, and says what is required; and they
recompile a sample of it (a different one whenever the kernels change), which must give the
recorded registers, spills and shared memory. The full matrix (every config on every target under
both launches, sm_100/sm_120, SASS counts) is the census: ``python -m benchmarks.ptxas_census``.
"""

import importlib
import json
import random
import re
from pathlib import Path

import pytest

import tangent_kernels.triton as triton_package
from benchmarks.pick_first_configs import first_config_problems
from helpers import compile_for_gpu_targets
from tangent_kernels.triton.compile_check import (RECORD_FIRST_CONFIG_TARGETS, RECORD_TARGETS,
                                                  RECORD_UNALIGNED_TARGETS, SPECIALIZATIONS, fingerprint,
                                                  first_configs, kernel_modules, tile_list)  # fmt: skip

KERNEL_MODULES = kernel_modules()
RECORD = Path(__file__).parent / "compile_record.json"
SAMPLE_SPECS = 4  # per module, recompiled for each record target
SAMPLE_FIRST_CONFIGS = 2  # per module, recompiled for each first-config target

# Tile lists whose first config cannot be spill-free or within 99 KB, each with what happens
# instead (the config comments in the kernel modules give the census's numbers).
EXCEPTIONS = {
    ("tangent_kernels.triton.attention", "fwd fp32-ieee D=256"): "the least spilling tile, 16×16",
    ("tangent_kernels.triton.attention_second_order", "dq fp32-ieee D=128"): "the least spilling tile, 16×16",
    ("tangent_kernels.triton.attention_second_order", "dkdv fp32-ieee D=128"): "the least spilling tile, 16×16",
    ("tangent_kernels.triton.attention_second_order", "dkdv fp32-tf32 D=128"): "112 KB: torch ops serve on sm_86/89",
}
# Tile lists whose first config is spill-free launched over N=4096 but not over N=197, where no
# config searched (every tile of at most the first one's area, 1-3 stages, 4 or 8 warps; 16 warps
# spill more) is spill-free everywhere: the first is the least spilling.
UNALIGNED_EXCEPTIONS = {
    ("tangent_kernels.triton.attention", "fwd fp32-ieee D=192"): "8-28 bytes on sm_80/86/89/90",
    ("tangent_kernels.triton.attention", "fwd fp32-tf32 D=256"): "4 bytes on sm_80",
}


def test_every_kernel_module_lists_its_specs():
    assert KERNEL_MODULES, "no Triton kernel modules found"
    if not triton_package.AVAILABLE:
        pytest.skip(triton_package.UNAVAILABLE_REASON)
    for module in KERNEL_MODULES:
        assert hasattr(importlib.import_module(module), "compile_specs"), f"{module} has no compile_specs()"


@pytest.fixture(scope="module")
def record() -> dict:
    """The record; skips on another Triton (the GPU machines carry Triton 3.6, which compiles
    differently and whose kernels their GPU tests compile and run for real)."""
    if not triton_package.AVAILABLE:
        pytest.skip(triton_package.UNAVAILABLE_REASON)
    record = json.loads(RECORD.read_text())
    if record["fingerprint"]["triton"] != fingerprint()["triton"]:
        pytest.skip(f"{RECORD.name} is of Triton {record['fingerprint']['triton']} (torch 2.14.1's, as in CI); "
                    f"this is Triton {fingerprint()['triton']}")  # fmt: skip
    return record


def _rows(record, module, targets, specialization="aligned") -> list[dict]:
    return [r for r in record["results"]
            if r["module"] == module and int(r["target"][3:]) in targets and r["specialization"] == specialization]


def _spec_names(module) -> list[str]:
    return [spec[0] for spec in importlib.import_module(module).compile_specs(SPECIALIZATIONS["aligned"])]


def test_record_is_of_these_kernels(record):
    assert record["fingerprint"]["sources"] == fingerprint()["sources"], (
        f"the Triton kernels changed since {RECORD.name} was written: run `make compile-record`")


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_record_covers_every_spec(record, module):
    names = _spec_names(module)
    firsts = first_configs(names)
    expected = {(name, f"sm_{t}", "aligned") for name in names for t in RECORD_TARGETS}
    expected |= {(name, f"sm_{t}", "aligned") for name in firsts for t in RECORD_FIRST_CONFIG_TARGETS}
    expected |= {(name, f"sm_{t}", "unaligned") for name in firsts for t in RECORD_UNALIGNED_TARGETS}
    recorded = [(r["spec"], r["target"], r["specialization"]) for r in record["results"] if r["module"] == module]
    assert sorted(recorded) == sorted(expected)


def _first_config_problems(results, module) -> dict:
    """``{(module, tile list): [problem, ...]}`` for the first configs that spill or exceed the
    shared memory of sm_86 (``first_config_problems``, the rule the first configs were picked by)."""
    firsts, problems = set(first_configs([r["spec"] for r in results])), {}
    for r in results:
        if r["spec"] in firsts:
            problems.setdefault((module, tile_list(r["spec"])), []).extend(first_config_problems(r))
    return {key: found for key, found in problems.items() if found}


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_compiles_for_sm80_and_sm90(record, module):
    """Every config fits sm_80 and sm_90; the first of each tile list is spill-free and within the
    shared memory of sm_86/89 (which compile as sm_80 does but allow 99 KB)."""
    results = _rows(record, module, RECORD_TARGETS)
    failures = [r for r in results if not r["ok"]]
    assert not failures, "\n".join(str(f) for f in failures[:10])
    assert {r["target"] for r in results} == {"sm_80", "sm_90"}
    assert all(0 < r["registers"] <= 255 for r in results)
    problems = _first_config_problems(results, module)
    assert problems.keys() == {key for key in EXCEPTIONS if key[0] == module}, problems


@pytest.mark.parametrize(("targets", "specialization"), [(RECORD_FIRST_CONFIG_TARGETS, "aligned"),
                                                         (RECORD_UNALIGNED_TARGETS, "unaligned")])  # fmt: skip
@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_first_configs_on_every_target_and_launch(record, module, targets, specialization):
    """The first configs compiled for sm_86 and sm_89 themselves (RTX 30xx/40xx, A10, L4, L40):
    ptxas allocates registers there differently from sm_80 (configs spill-free on sm_80 spilled
    4-56 bytes on sm_86), and they allow 99 KB of shared memory, not sm_80's 163 KB; and launched
    over an odd length on all four targets, where lengths and strides not divisible by 16 make
    narrower loads and more registers (tiles spill-free at N=4096 spilled 8-52 bytes at N=197)."""
    results = _rows(record, module, targets, specialization)
    failures = [r for r in results if not r["ok"] and (module, tile_list(r["spec"])) not in EXCEPTIONS]
    assert not failures, "\n".join(str(f) for f in failures[:10])
    problems = _first_config_problems(results, module)
    if specialization == "aligned":
        assert problems.keys() <= EXCEPTIONS.keys(), problems
    else:
        expected = {key for key in UNALIGNED_EXCEPTIONS if key[0] == module}
        assert expected <= problems.keys() <= EXCEPTIONS.keys() | expected, problems


def _recompiled(module, names, targets, specialization="aligned") -> list[dict]:
    pattern = "^(" + "|".join(map(re.escape, names)) + ")$"
    return compile_for_gpu_targets(module, "--registers", "--targets", ",".join(map(str, targets)),
                                   "--specializations", specialization, "--match", pattern)  # fmt: skip


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_record_reproduces(record, module):
    """A sample of the record, compiled here as a real launch would: the same outcome, registers,
    spills and shared memory (the sample changes with the kernel sources)."""
    rng = random.Random(record["fingerprint"]["sources"] + module)
    names = _spec_names(module)
    sample = rng.sample(names, min(SAMPLE_SPECS, len(names)))
    firsts = first_configs(names)
    first_sample = rng.sample(firsts, min(SAMPLE_FIRST_CONFIGS, len(firsts)))
    unaligned_sample = rng.sample(firsts, 1)
    results = (_recompiled(module, sample, RECORD_TARGETS)
               + _recompiled(module, first_sample, RECORD_FIRST_CONFIG_TARGETS)
               + _recompiled(module, unaligned_sample, RECORD_UNALIGNED_TARGETS, "unaligned"))  # fmt: skip
    assert len(results) == (len(sample) * len(RECORD_TARGETS) + len(first_sample) * len(RECORD_FIRST_CONFIG_TARGETS)
                            + len(RECORD_UNALIGNED_TARGETS))  # fmt: skip
    recorded = {(r["spec"], r["target"], r["specialization"]): r for r in record["results"] if r["module"] == module}
    fields = ("ok", "shared", "registers", "spill_bytes")
    for r in results:
        expected = recorded[(r["spec"], r["target"], r["specialization"])]
        assert {f: r.get(f) for f in fields} == {f: expected.get(f) for f in fields}, (r["spec"], r["target"])
