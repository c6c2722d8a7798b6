"""A PNG made from a run's stored results: speed-up of ours and peak memory per mode, per suite.

    python -m benchmarks.plot benchmarks/results/latest-cpu/results.json out.png
"""

from __future__ import annotations

import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_results(result: dict, path: pathlib.Path) -> None:
    """Top row: time of each other mode over ours, per case. Bottom row: peak memory per mode."""
    rows = [r for r in result["rows"] if "median_ms" in r]
    suites = sorted({r["suite"] for r in rows}) or ["(no results)"]
    fig, axes = plt.subplots(2, len(suites), figsize=(6 * len(suites), 8), squeeze=False)
    for column, suite in enumerate(suites):
        suite_rows = [r for r in rows if r["suite"] == suite]
        cases = list(dict.fromkeys(r["case"] for r in suite_rows))
        modes = list(dict.fromkeys(r["mode"] for r in suite_rows))
        table = {(r["case"], r["mode"]): r for r in suite_rows}
        width = 0.8 / max(len(modes), 1)
        speed, memory = axes[0][column], axes[1][column]
        for i, mode in enumerate(modes):
            xs = [j + i * width for j in range(len(cases))]
            ours = [table.get((c, "ours"), {}).get("median_ms") for c in cases]
            this = [table.get((c, mode), {}).get("median_ms") for c in cases]
            speed.bar(xs, [t / o if t and o else 0 for t, o in zip(this, ours)], width, label=mode)
            peak = [table.get((c, mode), {}).get("peak_memory_bytes", 0) / 2**20 for c in cases]
            memory.bar(xs, peak, width, label=mode)
        for ax, label in ((speed, "time / time of ours (higher: ours faster)"), (memory, "peak memory (MiB)")):
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], cases, rotation=30, ha="right", fontsize=7)
            ax.set_ylabel(label)
            ax.set_title(suite)
            ax.legend(fontsize=7)
        speed.axhline(1.0, color="black", linewidth=0.8)
    env = result.get("environment", {})
    fig.suptitle(f"{env.get('device')} · torch {env.get('torch')} · triton {env.get('triton')} · {env.get('commit', '')[:12]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    plot_results(json.loads(pathlib.Path(sys.argv[1]).read_text()), pathlib.Path(sys.argv[2]))
