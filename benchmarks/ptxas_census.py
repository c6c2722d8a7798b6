"""Register census of the Triton kernels, without a GPU: ptxas's registers and spill bytes per config.

    python -m benchmarks.ptxas_census [MODULE ...] [--out FOLDER]

Runs ``tangent_kernels.triton.compile_check --registers`` on each kernel module (default: all of
them) and writes the raw JSON lines and a summary (``README.md``) to FOLDER: the
worst spill per kernel, target and tile class, and every config that ptxas compiles into its
32-register mode (10 KB or more of spills), which only the autotuner on a GPU would reject.
Static counts, not timings.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
from pathlib import Path

from tangent_kernels.triton.compile_check import kernel_modules

PATHOLOGICAL_SPILL_BYTES = 10_000


def census(module: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    process = subprocess.run([sys.executable, "-m", "tangent_kernels.triton.compile_check", "--registers", module],
                             capture_output=True, text=True, env=env, check=True)  # fmt: skip
    return [json.loads(line) for line in process.stdout.splitlines() if line.startswith("{")]


def summary(rows: list[dict], versions: str) -> str:
    worst = collections.defaultdict(lambda: (0, 0))  # (module, kernel, tiles, target) -> (configs, max spill)
    for row in rows:
        key = (row["module"].rsplit(".", 1)[-1], *row["spec"].split()[:2], row["target"])
        count, spill = worst[key]
        worst[key] = (count + 1, max(spill, row["spill_bytes"]))
    lines = [
        "# ptxas register census of the Triton kernels (no GPU)", "",
        f"`python -m benchmarks.ptxas_census` ({versions}): every shipped config on both targets, raw lines in "
        "census.jsonl. Static counts only; nothing here was timed on a GPU.", "",
        "| module | kernel | tiles | target | configs | max spill bytes per thread |", "|---|---|---|---|---:|---:|",
    ]  # fmt: skip
    lines += [f"| {' | '.join(key)} | {n} | {s} |" for key, (n, s) in sorted(worst.items())]
    lines += ["", f"Configs in ptxas's 32-register mode ({PATHOLOGICAL_SPILL_BYTES} bytes of spills or more), "
              "left for the autotuner to reject:", ""]  # fmt: skip
    lines += [f"- {r['target']} {r['spec']}: {r['registers']} registers, {r['spill_bytes']} bytes"
              for r in rows if r["spill_bytes"] >= PATHOLOGICAL_SPILL_BYTES] or ["- none"]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", default=kernel_modules())
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/latest-ptxas"))
    args = parser.parse_args()
    import triton

    from tangent_kernels.triton.compile_check import ptxas_path

    ptxas = subprocess.run([ptxas_path(90), "--version"], capture_output=True, text=True).stdout
    versions = f"Triton {triton.__version__}, ptxas {ptxas.strip().splitlines()[-1]}"
    rows = [row for module in args.modules for row in census(module)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "census.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (args.out / "README.md").write_text(summary(rows, versions))
    print(f"wrote {args.out}/census.jsonl and README.md ({len(rows)} compiled configs)")


if __name__ == "__main__":
    main()
