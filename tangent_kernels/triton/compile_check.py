"""Compile Triton kernels for real GPU targets on a machine without a GPU (DESIGN.md §4).

The interpreter accepts code that a GPU compile rejects (mixed-dtype ``tl.dot``, tiny tiles,
tiles that overflow shared memory), so every kernel a module ships is also compiled here for the
NVIDIA targets, as a real launch specializes it: Triton's launcher reads the arguments (a pointer
16-byte aligned, an integer divisible by 16, an integer equal to 1) and compiles for what it
sees, so the same arguments go through Triton's own binder here. A kernel module lists what it can
launch in ``compile_specs(tokens)``, yielding ``(name, kernel, args, num_warps, num_stages)``:
``args`` maps every argument (constexprs included) to a launch value for a launch over ``tokens``
rows or keys, a tensor given by its ``torch.dtype`` (it is then 16-byte aligned, as torch's
allocator makes it).

Run as ``python -m tangent_kernels.triton.compile_check [--registers] [--sass] [--targets 80,90]
[--specializations aligned] [--match REGEX] [--first] MODULE [MODULE ...]`` (or ``--record FILE``); it prints one JSON line per
(spec, target, specialization) and exits non-zero if any fails to compile or exceeds the target's
shared memory or registers. ``--registers`` adds ptxas's registers per thread and spilled bytes
(from the ptxas run that built the cubin), ``--sass`` the instruction count of the key-tile loop
(``loop_instructions``) and the tensor-core instruction family. It must run without
``TRITON_INTERPRET=1`` (interpreted kernels cannot be compiled): the tests call it in a subprocess.

Compiling every shipped config takes about an hour of CPU time, too long for every test run, so it
is done when a kernel changes and kept: ``--record FILE`` compiles every spec of every module for
sm_80 and sm_90, the first config of each tile list for sm_86 and sm_89, and each first config
launched over an odd length for sm_80, sm_86, sm_89 and sm_90, and writes the results with the
``fingerprint`` of what they depend on (the sources of this package and Triton's version). The
tests check the record against the shipped specs and fingerprint, and recompile a sample of it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import io
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from . import INTERPRETING, SHARED_MEMORY_PER_BLOCK

TARGETS = tuple(SHARED_MEMORY_PER_BLOCK)
REGISTERS_PER_THREAD = 255
# Rows or keys of the launches compiled: a multiple of 16 (B=4, H=16, N=4096), and an odd length
# (ViT-B/16's 197 tokens), which Triton cannot specialize as divisible.
SPECIALIZATIONS = {"aligned": 4096, "unaligned": 197}


class _Tensor:
    """What Triton's launcher reads of a tensor argument: its dtype and a 16-byte aligned address."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def data_ptr(self) -> int:
        return 1 << 20


def specialize(kernel, args: dict, capability: int) -> tuple[dict, dict, dict]:
    """``(signature, constexprs, attrs)`` of a launch of ``kernel`` with ``args`` on
    ``sm_<capability>``, by Triton's own binder (as ``JITFunction.run`` builds them)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", capability, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    launch = {name: _Tensor(value) if isinstance(value, torch.dtype) else value for name, value in args.items()}
    bound, specialization, options = binder(**launch)
    _, signature, constexprs, attrs = kernel._pack_args(backend, {}, bound, specialization, options)
    return signature, constexprs, attrs


def compile_for_target(kernel, args, num_warps, num_stages, capability):
    """Compile ``kernel`` as launched with ``args`` for ``sm_<capability>``: returns Triton's
    compiled kernel and ptxas's log (registers and spills)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = specialize(kernel, args, capability)
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    log = io.StringIO()
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True  # Triton prints the log of the ptxas run it makes
        knobs.compilation.always_compile = True  # (a cached kernel runs no ptxas)
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
    return compiled, log.getvalue()


def ptxas_path(capability: int) -> str:
    """The ptxas that Triton compiles with (``get_ptxas`` returns a tool with ``.path`` since Triton
    3.4, a ``(path, version)`` pair before)."""
    from triton.backends.nvidia.compiler import get_ptxas

    tool = get_ptxas(capability)
    return tool.path if hasattr(tool, "path") else tool[0]


def register_usage(log: str) -> dict:
    """Registers per thread and spilled bytes, from ptxas's ``-v`` log."""
    return {"registers": int(re.search(r"Used (\d+) registers", log).group(1)),
            "spill_bytes": int(re.search(r"(\d+) bytes spill stores", log).group(1))}  # fmt: skip


def sass(compiled) -> str:
    """The SASS of a compiled kernel, by the ``nvdisasm`` beside Triton's ptxas."""
    nvdisasm = os.path.join(os.path.dirname(ptxas_path(80)), "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        return subprocess.run([nvdisasm, "-c", cubin.name], capture_output=True, text=True, check=True).stdout


_LABEL = re.compile(r"^\s*(\.L_x_\d+):", re.M)
_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", re.M)
_BRANCH = re.compile(r"\bBRA\b.*?(\.L_x_\d+)")


def innermost_loops(sass_text: str) -> list[list[str]]:
    """The opcodes of each innermost loop of a SASS listing: the instructions from a label up to a
    branch back to it, with no other backward branch inside (static count: both sides of a branch
    in the body are counted)."""
    labels, instructions = {}, []  # label -> index of the next instruction; [(opcode, target label)]
    for line in sass_text.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        instruction = _INSTRUCTION.match(line)
        if instruction:
            branch = _BRANCH.search(line)
            instructions.append((instruction.group(2), branch.group(1) if branch else None))
    back_edges = [(labels[target], end) for end, (_, target) in enumerate(instructions)
                  if target in labels and labels[target] < end]  # fmt: skip (a branch to itself ends the kernel)
    innermost = [(start, end) for start, end in back_edges
                 if not any(start <= s and e <= end and (s, e) != (start, end) for s, e in back_edges)]  # fmt: skip
    return [[opcode for opcode, _ in instructions[start : end + 1]] for start, end in innermost]


def sass_census(compiled) -> dict:
    """``loop_instructions``: SASS instructions in the largest innermost loop (the key-tile loop of
    an attention kernel: one iteration per key tile); ``steady_loop_instructions``: in the first
    innermost loop of the listing, which for the attention kernels is the loop over the tiles that
    run unmasked (all but the last partial tile and the causal diagonal; the masked loop follows
    and is the largest); ``mma``: its tensor-core instructions (``tcgen05`` on sm_100, ``wgmma`` on
    sm_90, ``mma.sync`` otherwise; none for FMA-unit products)."""
    loops = innermost_loops(sass(compiled))
    body = max(loops, key=len) if loops else []
    ptx = compiled.asm["ptx"]
    families = (("tcgen05.mma", "tcgen05"), ("wgmma.mma_async", "wgmma"), ("mma.sync", "mma.sync"))
    mma = next((name for instruction, name in families if instruction in ptx), "none")
    return {"loop_instructions": len(body) or None, "steady_loop_instructions": len(loops[0]) if loops else None,
            "mma": mma}


def kernel_modules() -> list[str]:
    """The modules of ``tangent_kernels.triton`` that ship kernels (each lists ``compile_specs()``)."""
    from .. import triton as package

    helpers = ("compile_check", "math")
    return sorted(f"{package.__name__}.{info.name}" for info in pkgutil.iter_modules(package.__path__)
                  if info.name not in helpers)  # fmt: skip


def tile_list(spec_name: str) -> str:
    """The tile list a spec belongs to: its name before the tile sizes (``"fwd bf16 D=64"`` of
    ``"fwd bf16 D=64 M=128 N=64 w=8 s=3"``); a spec without tile sizes is a list of its own. The
    first config of each list is the one that runs with autotuning off."""
    return spec_name.split(" M=")[0]


def first_configs(names: list[str]) -> list[str]:
    """The first spec of each tile list, in order: what runs with autotuning off."""
    firsts: dict[str, str] = {}
    for name in names:
        firsts.setdefault(tile_list(name), name)
    return list(firsts.values())


def _specs(module_name: str, tokens: int) -> list:
    return list(importlib.import_module(module_name).compile_specs(tokens))


def _compile_one(job: tuple) -> dict:
    """Compile spec number ``index`` of ``module_name`` for one target and specialization (runs in
    a worker)."""
    module_name, index, capability, specialization, registers, with_sass = job
    name, kernel, args, num_warps, num_stages = _specs(module_name, SPECIALIZATIONS[specialization])[index]
    result = {"module": module_name, "spec": name, "target": f"sm_{capability}", "specialization": specialization}
    try:
        compiled, log = compile_for_target(kernel, args, num_warps, num_stages, capability)
    except Exception as error:  # report every failure, not only the first
        result.update(ok=False, error=f"{type(error).__name__}: {error}"[:2000])
        return result
    shared, limit = compiled.metadata.shared, SHARED_MEMORY_PER_BLOCK[capability]
    usage = register_usage(log)
    result.update(ok=shared <= limit and usage["registers"] <= REGISTERS_PER_THREAD, shared=shared, shared_limit=limit)
    if registers:
        result.update(usage)
    if with_sass:
        result.update(sass_census(compiled))
    return result


def check_module(module_name, targets=TARGETS, specializations=tuple(SPECIALIZATIONS), match="", first=False,
                 registers=False, with_sass=False, workers=None):  # fmt: skip
    """Yield one result dict per (spec, target, specialization) of the kernel module ``module_name``,
    for the specs whose name matches the regular expression ``match`` (with ``first``, only the first
    of each tile list); specs compile in parallel worker processes (one per core by default)."""
    names = [spec[0] for spec in _specs(module_name, SPECIALIZATIONS["aligned"])]
    firsts = set(first_configs(names))
    chosen = [i for i, name in enumerate(names) if re.search(match, name) and (not first or name in firsts)]
    jobs = [(module_name, index, capability, specialization, registers, with_sass)
            for index in chosen for capability in targets for specialization in specializations]  # fmt: skip
    workers = workers or os.cpu_count() or 1
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
        yield from pool.map(_compile_one, jobs)


# What a record holds: every spec for these targets, and each tile list's first config for these
# (sm_86 allocates registers differently from sm_80; sm_86 and sm_89 allow 99 KB of shared memory),
# and each first config launched over an odd length (narrower loads, more registers) for these.
RECORD_TARGETS = (80, 90)
RECORD_FIRST_CONFIG_TARGETS = (86, 89)
RECORD_UNALIGNED_TARGETS = (80, 86, 89, 90)


def fingerprint() -> dict:
    """What compile results depend on: Triton's version and the sources of this package (the
    kernels, their configs and compile specs, and this checker)."""
    import triton

    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")) + sorted(Path(__file__).parent.glob("*.json")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return {"triton": triton.__version__, "sources": digest.hexdigest()}


def write_record(path: str, workers=None) -> list[dict]:
    """Compile the record's matrix for every kernel module and write it to ``path`` (JSON: the
    ``fingerprint`` and one result per spec, target and specialization); returns the results that
    failed to compile or fit (the tests judge them: some are known, see their ``EXCEPTIONS``)."""
    results = []
    for module_name in kernel_modules():
        results += check_module(module_name, RECORD_TARGETS, ("aligned",), registers=True, workers=workers)
        results += check_module(module_name, RECORD_FIRST_CONFIG_TARGETS, ("aligned",), first=True, registers=True,
                                workers=workers)  # fmt: skip
        results += check_module(module_name, RECORD_UNALIGNED_TARGETS, ("unaligned",), first=True, registers=True,
                                workers=workers)  # fmt: skip
    rows = ",\n".join(json.dumps(r) for r in results)  # one result per line: a change reads as a diff
    Path(path).write_text(f'{{"fingerprint": {json.dumps(fingerprint())},\n"results": [\n{rows}\n]}}\n')
    return [r for r in results if not r["ok"]]


def main(argv: list[str]) -> int:
    if INTERPRETING:
        print("compile_check must run without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*")
    parser.add_argument("--record", metavar="FILE", help="compile the record's matrix of every module into FILE")
    parser.add_argument("--registers", action="store_true")
    parser.add_argument("--sass", action="store_true")
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)))
    parser.add_argument("--specializations", default=",".join(SPECIALIZATIONS))
    parser.add_argument("--match", default="", help="only the specs whose name matches this regular expression")
    parser.add_argument("--first", action="store_true", help="only the first config of each tile list")
    args = parser.parse_args(argv)
    if args.record:
        failed = write_record(args.record)
        print(f"{args.record} written; {len(failed)} failed to compile or fit (`make test` judges them):", file=sys.stderr)
        for r in failed:
            why = r.get("error") or f"{r['shared']} bytes of shared memory, {r['registers']} registers"
            print(f"  {r['module']} {r['spec']} {r['target']}: {why}", file=sys.stderr)
        return 0
    if not args.modules:
        parser.error("name the kernel modules to compile, or --record FILE")
    targets = tuple(int(t) for t in args.targets.split(","))
    specializations = tuple(args.specializations.split(","))
    if any(t not in SHARED_MEMORY_PER_BLOCK for t in targets):
        parser.error(f"--targets: {args.targets} has one without a known shared-memory limit ({TARGETS})")
    if any(s not in SPECIALIZATIONS for s in specializations):
        parser.error(f"--specializations: {args.specializations} is not among {tuple(SPECIALIZATIONS)}")
    failed = 0
    for module_name in args.modules:
        for result in check_module(module_name, targets, specializations, args.match, args.first, args.registers,
                                   args.sass):  # fmt: skip
            print(json.dumps(result), flush=True)
            failed += not result["ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
