"""Static census of the Triton kernels, without a GPU: what ptxas and the SASS say of each config.

    python -m benchmarks.ptxas_census [MODULE ...] [--out FOLDER] [--targets 80,90]
        [--specializations aligned] [--match REGEX] [--first] [--tutorial FILE]

Compiles every shipped config (``tangent_kernels.triton.compile_check``) for each target and each
launch specialization, and writes one JSON line per (kernel, config, target, specialization) to
FOLDER/census.jsonl: ``kernel``, ``config``, ``target``, ``specialization``, ``registers``,
``spill_bytes``, ``shared_bytes``, ``fits`` (the target's shared memory and 255 registers),
``mma``, ``sass_instructions_per_tile`` (the SASS instructions of the kernel's largest innermost
tile loop: one key tile of an attention kernel, one K tile of the linear kernel; none for kernels
without a loop) and ``sass_instructions_per_steady_tile`` (those of the first innermost loop: for
the attention kernels, the loop over the tiles that run unmasked), and a summary FOLDER/README.md. This module's own ``compile_specs`` adds the
yardstick: the plain flash forward of ``benchmarks.flash_reference`` and our forward without mask
or causality, fp16, 128×64 tiles; ``--tutorial`` adds counts of Triton's tutorial forward made
elsewhere (its code stays out of the project). Static counts only: nothing here is timed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from tangent_kernels.triton.compile_check import SPECIALIZATIONS, TARGETS, kernel_modules, tile_list

YARDSTICK_CONFIGS = {64: (128, 64, 8, 3), 128: (128, 64, 8, 2)}  # head dim -> (BLOCK_M, BLOCK_N, warps, stages)


def compile_specs(tokens):
    """The yardstick (``compile_check`` protocol): per head dim, the plain flash forward, and our
    forward with all three tangents and with none, all without mask or causality, in fp16."""
    from benchmarks.flash_reference import _flash_fwd_kernel
    from tangent_kernels.triton.attention import MASK_NONE, _attention_jvp_fwd_kernel, launch_args

    for head_dim, (block_m, block_n, warps, stages) in YARDSTICK_CONFIGS.items():
        config = f"fp16 D={head_dim} M={block_m} N={block_n} w={warps} s={stages}"
        tiles = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=head_dim)
        ours = dict(tiles, BLOCK_D2=0)
        args = launch_args(_flash_fwd_kernel, torch.float16, tokens, head_dim, (), tiles)
        yield f"reference {config}", _flash_fwd_kernel, args, warps, stages
        for name, tangents in (("fwd+tangent", True), ("fwd-primal", False)):
            flags = dict(HAS_Q_T=tangents, HAS_K_T=tangents, HAS_V_T=tangents, MASK_KIND=MASK_NONE, IS_CAUSAL=False,
                         DOT_PRECISION="tf32", **ours)  # fmt: skip
            args = launch_args(_attention_jvp_fwd_kernel, torch.float16, tokens, head_dim, {"LSE"}, flags)
            yield f"{name} {config}", _attention_jvp_fwd_kernel, args, warps, stages


def census(module: str, options: list[str]) -> list[dict]:
    """One row per compiled (spec, target, specialization) of ``module``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    process = subprocess.run([sys.executable, "-m", "tangent_kernels.triton.compile_check", "--registers", "--sass",
                              *options, module], capture_output=True, text=True, env=env)  # fmt: skip
    results = [json.loads(line) for line in process.stdout.splitlines() if line.startswith("{")]
    if not results:
        raise RuntimeError(f"no results for {module}: {process.stderr[-4000:]}")
    rows = []
    for r in results:
        kernel, _, config = r["spec"].partition(" ")
        rows.append({"kernel": f"{r['module'].rsplit('.', 1)[-1]} {kernel}", "config": config, "target": r["target"],
                     "specialization": r["specialization"], "registers": r.get("registers"),
                     "spill_bytes": r.get("spill_bytes"), "shared_bytes": r.get("shared"), "fits": r["ok"],
                     "mma": r.get("mma"), "sass_instructions_per_tile": r.get("loop_instructions"),
                     "sass_instructions_per_steady_tile": r.get("steady_loop_instructions"),
                     **({"error": r["error"]} if "error" in r else {})})  # fmt: skip
    return rows


def _yardstick_table(rows: list[dict], tutorial: list[dict]) -> list[str]:
    counts = {(r["kernel"].split()[-1], r["config"].split()[1], r["target"], r["specialization"]):
              r["sass_instructions_per_steady_tile"] for r in rows if r["kernel"].startswith("ptxas_census")}  # fmt: skip
    counts.update({("tutorial", f"D={t['D']}", t["target"], "aligned"): t["loop_instructions"] for t in tutorial})
    names = ("tutorial", "reference", "fwd-primal", "fwd+tangent")
    lines = ["| target | head dim | launch | tutorial | reference | fwd-primal | fwd+tangent | fwd-primal / tutorial | "
             "fwd+tangent / tutorial | fwd-primal / reference | fwd+tangent / reference |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for target, head_dim, launch in sorted({(key[2], key[1], key[3]) for key in counts if key[0] != "tutorial"}):
        n = {name: counts.get((name, head_dim, target, launch)) for name in names}

        def ratio(a, b):
            return f"{n[a] / n[b]:.2f}" if n[a] and n[b] else "–"

        ratios = (("fwd-primal", "tutorial"), ("fwd+tangent", "tutorial"), ("fwd-primal", "reference"),
                  ("fwd+tangent", "reference"))  # fmt: skip
        lines.append(f"| {target} | {head_dim} | {launch} | " + " | ".join(str(v or "–") for v in n.values()) + " | "
                     + " | ".join(ratio(a, b) for a, b in ratios) + " |")  # fmt: skip
    return lines


def _first_config_table(rows: list[dict], firsts: dict) -> list[str]:
    """Per first config and target: registers / spill bytes / shared KB / SASS instructions per tile."""
    targets = sorted({r["target"] for r in rows}, key=lambda t: int(t[3:]))
    cells = {}
    for r in rows:
        if firsts[(r["kernel"], tile_list(r["config"]))] == r["config"] and r["specialization"] == "aligned":
            cell = "–" if not r["registers"] else (f"{r['registers']} / {r['spill_bytes']} / {r['shared_bytes'] // 1024}"
                                                   f" / {r['sass_instructions_per_tile'] or '–'}")  # fmt: skip
            cells.setdefault((r["kernel"], r["config"]), {})[r["target"]] = cell + ("" if r["fits"] else " (no fit)")
    return ["First configs, aligned launch: registers / spill bytes / shared KB / SASS instructions per tile "
            "(one BLOCK_M × BLOCK_N tile of that config):", "",
            f"| kernel | config | {' | '.join(targets)} |", "|---|---|" + "---|" * len(targets),
            *(f"| {kernel} | {config} | " + " | ".join(by_target.get(t, "") for t in targets) + " |"
              for (kernel, config), by_target in sorted(cells.items()))]  # fmt: skip


def summary(rows: list[dict], versions: str, seconds: float, command: str, tutorial: list[dict]) -> str:
    shipped = [r for r in rows if not r["kernel"].startswith("ptxas_census")]
    worst = collections.defaultdict(lambda: [0, 0, 0, 0, 0])  # configs, unfit, spilling, max spill, max registers
    for r in shipped:
        w = worst[(r["kernel"], r["config"].split()[0], r["target"], r["specialization"])]
        w[0] += 1
        w[1] += not r["fits"]
        w[2] += bool(r["spill_bytes"])
        w[3] = max(w[3], r["spill_bytes"] or 0)
        w[4] = max(w[4], r["registers"] or 0)
    firsts = {}
    for r in shipped:  # the first config of each tile list: what runs with TANGENT_KERNELS_AUTOTUNE=0
        firsts.setdefault((r["kernel"], tile_list(r["config"])), r["config"])

    def runs_everywhere(r):
        return r["fits"] and not r["spill_bytes"] and (r["target"] != "sm_80" or r["shared_bytes"] <= 101376)

    bad_first = sorted({(r["kernel"], r["config"], r["target"], r["specialization"]) for r in shipped
                        if firsts[(r["kernel"], tile_list(r["config"]))] == r["config"] and not runs_everywhere(r)})  # fmt: skip
    lines = [
        "# Static census of the Triton kernels (no GPU)", "",
        f"`{command}` ({versions}), {len(rows)} compiles in {seconds / 60:.0f} min on this machine's CPUs; "
        "raw lines in census.jsonl. Each kernel is compiled as a real launch specializes it (Triton's "
        "own binder on launch-shaped arguments, B=4 H=16 bf16/fp16/fp32: `aligned` N=4096, `unaligned` "
        "N=197). Registers and spills are from the ptxas run that built the cubin; "
        "`sass_instructions_per_tile` counts the SASS instructions (nvdisasm) of the largest innermost loop, "
        "from its label to the branch back (both sides of any branch inside); for the attention kernels that "
        "is the masked loop (the last partial tile, the causal diagonal), and the yardstick below counts the "
        "first loop, over the tiles that run unmasked (`sass_instructions_per_steady_tile`; the reference and "
        "the tutorial have one loop). Static counts only; nothing here was timed on a GPU.", "",
        "## Yardstick: SASS instructions per 128×64 key tile (fp16, no mask, not causal)", "",
        "`tutorial`: Triton's tutorial 06-fused-attention `_attn_fwd` (block pointers, commit 003da478), compiled "
        "outside the project with the same specialization and tiles; `reference`: benchmarks/flash_reference.py; "
        "`fwd-primal` / `fwd+tangent`: our forward with no tangent / all three.", "",
        *_yardstick_table(rows, tutorial), "",
        "## First configs (autotuning off) that do not fit every target or spill", "",
        "Each target's own limits; an sm_80 compile is also held to sm_86/89's 101376 bytes (they compile alike). "
        "The exceptions are listed in tests/test_compile_targets.py.", "",
    ]  # fmt: skip
    lines += [f"- {kernel} {config} on {target} ({spec})" for kernel, config, target, spec in bad_first] or ["- none"]
    lines += ["", *_first_config_table(shipped, firsts)]
    lines += ["", "## Per kernel, tile class, target and specialization", "",
              "| kernel | tiles | target | specialization | configs | not fitting | spilling | max spill bytes | "
              "max registers |",
              "|---|---|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {' | '.join(key)} | {' | '.join(map(str, w))} |" for key, w in sorted(worst.items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", default=[*kernel_modules(), "benchmarks.ptxas_census"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/latest-ptxas"))
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)))
    parser.add_argument("--specializations", default=",".join(SPECIALIZATIONS))
    parser.add_argument("--match", default="", help="only the specs whose name matches this regular expression")
    parser.add_argument("--first", action="store_true", help="only the first config of each tile list")
    parser.add_argument("--tutorial", type=Path, help="JSON lines of the tutorial's counts (target, D, loop_instructions)")
    args = parser.parse_args()
    import triton

    from tangent_kernels.triton.compile_check import ptxas_path

    ptxas = subprocess.run([ptxas_path(90), "--version"], capture_output=True, text=True).stdout
    versions = f"Triton {triton.__version__}, ptxas {ptxas.strip().splitlines()[-1]}"
    options = ["--targets", args.targets, "--specializations", args.specializations, "--match", args.match,
               *(["--first"] if args.first else [])]  # fmt: skip
    start = time.time()
    rows = [row for module in args.modules for row in census(module, options)]
    tutorial = [json.loads(line) for line in args.tutorial.read_text().splitlines()] if args.tutorial else []
    command = "python -m benchmarks.ptxas_census " + shlex.join(sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "census.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if tutorial:
        (args.out / "tutorial.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tutorial))
    (args.out / "README.md").write_text(summary(rows, versions, time.time() - start, command.strip(), tutorial))
    print(f"wrote {args.out}/census.jsonl and README.md ({len(rows)} compiles, {time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
