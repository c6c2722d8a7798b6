"""Pick a tile list's first config (what runs with autotuning off) from compiles, without a GPU.

    python -m benchmarks.pick_first_configs attention:dq:16-bit:64 attention:fwd:tf32:256 ...

For each list (``module:kernel:tile class:width``, e.g. ``attention:dq:16-bit:64`` for the
16-bit dQ tiles at head-dim width 64), candidates are compiled as real launches over N=4096 and
N=197 (``compile_check.SPECIALIZATIONS``) for sm_80, sm_86, sm_89 and sm_90, in every dtype of the
class: first the list's own configs in order, then every tile of at most the first one's area
(BLOCK_M, BLOCK_N in 16..128, 1-3 stages, 8 or 4 warps), largest first. The first candidate that
is spill-free and fits (99 KB on sm_80/86/89, the target's own limit on sm_90) in every compile
is printed; a candidate stops at its first failing compile. One JSON line per candidate tried.
This is how the 18 lists re-picked for the N=197 launch were found (ptxas-2026-12-02e).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

from tangent_kernels.triton import INTERPRETING, SHARED_MEMORY_PER_BLOCK
from tangent_kernels.triton.compile_check import SPECIALIZATIONS, compile_for_target, register_usage

TARGETS = (80, 86, 89, 90)
# The config table of each tiled kernel, by the name its compile specs start with.
TABLES = {
    "attention": {"fwd": "_FWD_CONFIGS", "dkdv": "_DKDV_CONFIGS", "dq": "_DQ_CONFIGS"},
    "attention_second_order": {"stats": "_STATS_CONFIGS", "dq": "_DQ_CONFIGS", "dkdv": "_DKDV_CONFIGS"},
}
# The spec labels (compiled_variants) of each tile class.
LABELS = {"16-bit": ("fp16", "bf16"), "tf32": ("fp32-tf32",), "ieee": ("fp32-ieee",)}


def candidates(shipped: list[tuple]) -> list[tuple]:
    """The list's own configs, then every other (BLOCK_M, BLOCK_N, warps, stages) of at most the
    first config's tile area: largest area first, then more stages, taller tiles, 8 warps before 4."""
    area = shipped[0][0] * shipped[0][1]
    grid = [c for c in itertools.product((128, 64, 32, 16), (128, 64, 32, 16), (8, 4), (3, 2, 1))
            if c[0] * c[1] <= area and c not in shipped]  # fmt: skip
    return list(shipped) + sorted(grid, key=lambda c: (-c[0] * c[1], -c[3]))


def spec(module: str, kernel: str, tile_class: str, width: int, config: tuple, label: str, tokens: int):
    """The compile spec ``(name, kernel, args, warps, stages)`` of ``kernel`` in ``module`` for one
    ``config`` of the list (``tile_class``, ``width``) in the dtype ``label``, over ``tokens``."""
    kernels = importlib.import_module(f"tangent_kernels.triton.{module}")
    table = getattr(kernels, TABLES[module][kernel])[tile_class]
    shipped = table[width]
    table[width] = [config]
    try:
        prefix = f"{kernel} {label} D={width} "
        return next(s for s in kernels.compile_specs(tokens) if s[0].startswith(prefix))
    finally:
        table[width] = shipped


def first_config_problems(result: dict) -> list[str]:
    """Why a compile ``result`` (``target`` "sm_XX", ``spill_bytes``, ``shared``) cannot be a first
    config: register spills, or more shared memory than sm_86/89's 99 KB (the smallest of the
    targets, and sm_80's compiles run there too; sm_90 is held to its own). Empty when it can."""
    target = int(result["target"].removeprefix("sm_"))
    limit = SHARED_MEMORY_PER_BLOCK[90] if target == 90 else SHARED_MEMORY_PER_BLOCK[86]
    problems = [f"{result['target']}: {result['spill_bytes']} bytes of spills"] if result["spill_bytes"] else []
    if result["shared"] > limit:
        problems.append(f"{result['target']}: {result['shared']} bytes of shared memory")
    return problems


def compile_one(job: tuple) -> dict:
    """Compile one (list, config, dtype, launch, target): spills, registers, shared memory, ``ok``."""
    module, kernel, tile_class, width, config, label, launch, target = job
    name, fn, args, warps, stages = spec(module, kernel, tile_class, width, config, label, SPECIALIZATIONS[launch])
    result = {"spec": name, "launch": launch, "target": f"sm_{target}"}
    try:
        compiled, log = compile_for_target(fn, args, warps, stages, target)
    except Exception as error:  # a config that cannot compile is a failed candidate
        return {**result, "ok": False, "error": f"{type(error).__name__}: {error}"[:300]}
    result.update(register_usage(log), shared=compiled.metadata.shared)
    return {**result, "ok": not first_config_problems(result)}


def pick(pool, workers: int, module: str, kernel: str, tile_class: str, width: int) -> tuple | None:
    """The first candidate of the list that passes every compile (``None`` if none does); compiles
    run ``workers`` at a time in ``pool``."""
    shipped = getattr(importlib.import_module(f"tangent_kernels.triton.{module}"), TABLES[module][kernel])
    for config in candidates(shipped[tile_class][width]):
        jobs = [(module, kernel, tile_class, width, config, label, launch, target)
                for launch in ("unaligned", "aligned") for target in TARGETS for label in LABELS[tile_class]]  # fmt: skip
        failed = None
        for start in range(0, len(jobs), workers):  # a batch at a time, so a failure stops the rest
            failed = next((r for r in pool.map(compile_one, jobs[start : start + workers]) if not r["ok"]), None)
            if failed:
                break
        print(json.dumps({"list": f"{module}:{kernel}:{tile_class}:{width}", "config": config, "failed": failed}),
              flush=True)  # fmt: skip
        if not failed:
            return config
    return None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lists", nargs="+", help="module:kernel:tile class:width, e.g. attention:dq:16-bit:64")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if INTERPRETING:
        parser.error("compiles for GPU targets: run without TRITON_INTERPRET=1")
    wanted = []
    kernels = {module: sorted(tables) for module, tables in TABLES.items()}
    for entry in args.lists:
        parts = entry.split(":")
        module, kernel, tile_class, width = parts if len(parts) == 4 else ("", "", "", "")
        if kernel not in kernels.get(module, ()) or tile_class not in LABELS or not width.isdigit():
            parser.error(f"{entry}: expected module:kernel:class:width, a kernel of {kernels}, a class of "
                         f"{tuple(LABELS)}")  # fmt: skip
        table = getattr(importlib.import_module(f"tangent_kernels.triton.{module}"), TABLES[module][kernel])
        if int(width) not in table[tile_class]:
            parser.error(f"{entry}: {module} {kernel} {tile_class} has lists for widths {sorted(table[tile_class])}")
        wanted.append((module, kernel, tile_class, int(width)))
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("fork")) as pool:
        for module, kernel, tile_class, width in wanted:
            found = pick(pool, args.workers, module, kernel, tile_class, width)
            print(f"{module}:{kernel}:{tile_class}:{width} -> {found}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
