"""Compile Triton kernels for real GPU targets on a machine without a GPU (DESIGN.md §4).

The interpreter accepts code that a GPU compile rejects (mixed-dtype ``tl.dot``, tiny tiles,
tiles that overflow shared memory), so every kernel a module ships is also compiled for sm_80 and
sm_90 here. A kernel module lists what it can launch in ``compile_specs()``, yielding
``(name, kernel, signature, constexprs, num_warps[, num_stages])``.

Run as ``python -m tangent_kernels.triton.compile_check [--registers] MODULE [MODULE ...]``; it
prints one JSON line per (spec, target) and exits non-zero if any fails to compile or overflows
shared memory. ``--registers`` adds ptxas's count of registers per thread and spilled bytes.
It must run without ``TRITON_INTERPRET=1`` (the interpreter replaces kernels by Python functions
that cannot be compiled), which is why the tests call it in a subprocess.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

from . import SHARED_MEMORY_PER_BLOCK, INTERPRETING

TARGETS = (80, 90)


def compile_for_target(kernel, signature, constexprs, num_warps, num_stages, capability):
    """Compile ``kernel`` for ``sm_<capability>``: returns Triton's compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


def ptxas_path(capability: int) -> str:
    """The ptxas that Triton compiles with (``get_ptxas`` returns a tool with ``.path`` since Triton
    3.4, a ``(path, version)`` pair before)."""
    from triton.backends.nvidia.compiler import get_ptxas

    tool = get_ptxas(capability)
    return tool.path if hasattr(tool, "path") else tool[0]


def register_usage(compiled, capability: int) -> dict:
    """Registers per thread and spilled bytes, from ``ptxas -v`` on the kernel's PTX (as Triton
    runs ptxas, whose log it does not keep)."""
    arch = f"sm_{capability}a" if capability == 90 else f"sm_{capability}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        log = subprocess.run([ptxas_path(capability), "-v", f"--gpu-name={arch}", ptx.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr  # fmt: skip
    return {"registers": int(re.search(r"Used (\d+) registers", log).group(1)),
            "spill_bytes": int(re.search(r"(\d+) bytes spill stores", log).group(1))}  # fmt: skip


def kernel_modules() -> list[str]:
    """The modules of ``tangent_kernels.triton`` that ship kernels (each lists ``compile_specs()``)."""
    from .. import triton as package

    helpers = ("compile_check", "math")
    return sorted(f"{package.__name__}.{info.name}" for info in pkgutil.iter_modules(package.__path__)
                  if info.name not in helpers)  # fmt: skip


def _specs(module_name: str) -> list:
    return list(importlib.import_module(module_name).compile_specs())


def _compile_one(job: tuple[str, int, int, bool]) -> dict:
    """Compile spec number ``index`` of ``module_name`` for one target (runs in a worker)."""
    module_name, index, capability, with_registers = job
    spec = _specs(module_name)[index]
    name, kernel, signature, constexprs, num_warps = spec[:5]
    num_stages = spec[5] if len(spec) > 5 else 3
    result = {"module": module_name, "spec": name, "target": f"sm_{capability}"}
    try:
        compiled = compile_for_target(kernel, signature, constexprs, num_warps, num_stages, capability)
    except Exception as error:  # report every failure, not only the first
        result.update(ok=False, error=f"{type(error).__name__}: {error}"[:2000])
    else:
        shared, limit = compiled.metadata.shared, SHARED_MEMORY_PER_BLOCK[capability]
        result.update(ok=shared <= limit, shared=shared, shared_limit=limit)
        if with_registers:
            result.update(register_usage(compiled, capability))
    return result


def check_module(module_name: str, workers: int | None = None, registers: bool = False):
    """Yield one result dict per (spec, target) of the kernel module ``module_name``.

    Specs compile in parallel worker processes (one per core by default); ``registers`` adds
    ptxas's register and spill counts.
    """
    jobs = [(module_name, i, capability, registers) for i in range(len(_specs(module_name))) for capability in TARGETS]
    workers = workers or os.cpu_count() or 1
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
        yield from pool.map(_compile_one, jobs)


def main(argv: list[str]) -> int:
    if INTERPRETING:
        print("compile_check must run without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    registers = "--registers" in argv
    failed = 0
    for module_name in (arg for arg in argv if arg != "--registers"):
        for result in check_module(module_name, registers=registers):
            print(json.dumps(result), flush=True)
            failed += not result["ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
