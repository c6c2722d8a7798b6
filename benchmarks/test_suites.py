"""The benchmark suites under pytest-benchmark, one test per (case, mode).

    python -m pytest benchmarks/test_suites.py --benchmark-json=out.json [--benchmark-only]

The same cases as ``python -m benchmarks.run`` (the main job, which adds FLOP rates, peak and
saved memory, correctness, figures and report.md); this is for pytest-benchmark's comparison tooling
(``pytest-benchmark compare``). Not part of the test suite: timings are not tests.
"""

from __future__ import annotations

import functools
import importlib

import pytest
import torch

from benchmarks.run import SUITES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.cache
def suite_cases(suite: str):
    return importlib.import_module(f"benchmarks.suites.{suite}").cases(DEVICE, DEVICE.type == "cuda")


def _synchronized(fn):
    if DEVICE.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def _ids():
    for suite in SUITES:
        for index, case in enumerate(suite_cases(suite)):
            for mode in case.modes:
                yield pytest.param(suite, index, mode, id=f"{suite}/{case.name}/{mode}")


@pytest.mark.parametrize("suite,index,mode", list(_ids()))
def test_benchmark(benchmark, suite, index, mode):
    case = suite_cases(suite)[index]
    benchmark.group = f"{suite}/{case.name}"
    benchmark.extra_info.update({"mode": mode, **case.params, "flops": case.flops.get(mode)})
    benchmark(_synchronized(case.modes[mode]))
