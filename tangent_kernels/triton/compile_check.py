"""Compile Triton kernels for real GPU targets on a machine without a GPU (DESIGN.md §4).

The interpreter accepts code that a GPU compile rejects (mixed-dtype ``tl.dot``, tiny tiles,
tiles that overflow shared memory), so every kernel a module ships is also compiled for sm_80 and
sm_90 here. A kernel module lists what it can launch in ``compile_specs()``, yielding
``(name, kernel, signature, constexprs, num_warps[, num_stages])``.

Run as ``python -m tangent_kernels.triton.compile_check MODULE [MODULE ...]``; it prints one JSON
line per (spec, target) and exits non-zero if any fails to compile or overflows shared memory.
It must run without ``TRITON_INTERPRET=1`` (the interpreter replaces kernels by Python functions
that cannot be compiled), which is why the tests call it in a subprocess.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

from . import SHARED_MEMORY_PER_BLOCK, INTERPRETING

TARGETS = (80, 90)


def compile_for_target(kernel, signature, constexprs, num_warps, num_stages, capability):
    """Compile ``kernel`` for ``sm_<capability>``: returns the bytes of shared memory it needs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
    return compiled.metadata.shared


def _specs(module_name: str) -> list:
    return list(importlib.import_module(module_name).compile_specs())


def _compile_one(job: tuple[str, int, int]) -> dict:
    """Compile spec number ``index`` of ``module_name`` for one target (runs in a worker)."""
    module_name, index, capability = job
    spec = _specs(module_name)[index]
    name, kernel, signature, constexprs, num_warps = spec[:5]
    num_stages = spec[5] if len(spec) > 5 else 3
    result = {"module": module_name, "spec": name, "target": f"sm_{capability}"}
    try:
        shared = compile_for_target(kernel, signature, constexprs, num_warps, num_stages, capability)
    except Exception as error:  # report every failure, not only the first
        result.update(ok=False, error=f"{type(error).__name__}: {error}"[:2000])
    else:
        limit = SHARED_MEMORY_PER_BLOCK[capability]
        result.update(ok=shared <= limit, shared=shared, shared_limit=limit)
    return result


def check_module(module_name: str, workers: int | None = None):
    """Yield one result dict per (spec, target) of the kernel module ``module_name``.

    Specs compile in parallel worker processes (one per core by default).
    """
    jobs = [(module_name, i, capability) for i in range(len(_specs(module_name))) for capability in TARGETS]
    workers = workers or os.cpu_count() or 1
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
        yield from pool.map(_compile_one, jobs)


def main(argv: list[str]) -> int:
    if INTERPRETING:
        print("compile_check must run without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    failed = 0
    for module_name in argv:
        for result in check_module(module_name):
            print(json.dumps(result), flush=True)
            failed += not result["ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
