"""Record, from a GPU run's results, where the fused linear GEMM beat the composite path.

    python -m benchmarks.linear_paths benchmarks/results/<gpu run>/results.json

For every mlp case of the run, both of the MLP's weight shapes go into
``tangent_kernels/triton/linear_paths.json`` under the GPU's name when "ours fused GEMM" was
faster than "ours composite" (and are removed when it was not); ``linear_jvp`` / ``mlp_jvp`` on
``"auto"`` then follow the measurement.
"""

from __future__ import annotations

import json
import pathlib
import sys

from tangent_kernels.triton.linear import MEASURED_PATHS


def update(result: dict, table: dict) -> dict:
    gpu = result["environment"]["device"]
    shapes = {tuple(s) for s in table.get(gpu, [])}
    rows = {(r["case"], r["mode"]): r for r in result["rows"] if r["suite"] == "mlp" and "median_ms" in r}
    for (case, mode), row in rows.items():
        if mode != "ours fused GEMM" or (case, "ours composite") not in rows:
            continue
        weights = {(row["hidden"], row["features"]), (row["features"], row["hidden"])}
        if row["median_ms"] < rows[(case, "ours composite")]["median_ms"]:
            shapes |= weights
        else:
            shapes -= weights
    return {**table, gpu: sorted(list(s) for s in shapes)}


if __name__ == "__main__":
    table = json.loads(MEASURED_PATHS.read_text()) if MEASURED_PATHS.exists() else {}
    table = update(json.loads(pathlib.Path(sys.argv[1]).read_text()), table)
    MEASURED_PATHS.write_text(json.dumps(table, indent=1) + "\n")
    print(json.dumps(table, indent=1))
