"""A PNG made from a run's stored results: per suite, the speed-up of ours over every other mode
and the peak memory of every mode, against the case's size (sequence length, model, ...).

    python -m benchmarks.plot benchmarks/results/latest-cpu/results.json out.png
"""

from __future__ import annotations

import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# What each suite varies along its x axis (a case parameter); other suites use the case name.
X_AXIS = {"attention": "n", "vit": "model", "mlp": "batch"}


def _ours_mode(modes: list[str]) -> str | None:
    return next((m for m in modes if m == "ours" or m.startswith("ours (all")), None)


def plot_results(result: dict, path: pathlib.Path) -> None:
    rows = [r for r in result["rows"] if "median_ms" in r]
    suites = sorted({r["suite"] for r in rows}) or ["(no results)"]
    fig, axes = plt.subplots(2, len(suites), figsize=(5.5 * len(suites), 8), squeeze=False)
    for column, suite in enumerate(suites):
        suite_rows = [r for r in rows if r["suite"] == suite]
        cases = list(dict.fromkeys(r["case"] for r in suite_rows))
        modes = list(dict.fromkeys(r["mode"] for r in suite_rows))
        table = {(r["case"], r["mode"]): r for r in suite_rows}
        key = X_AXIS.get(suite)
        labels = [str(table[(c, modes[0])].get(key, c)) if (c, modes[0]) in table and key else c for c in cases]
        xs = list(range(len(cases)))
        ours = _ours_mode(modes)
        speed, memory = axes[0][column], axes[1][column]
        for mode in modes:
            if ours and mode != ours:
                ratio = [table.get((c, mode), {}).get("median_ms", float("nan")) / table[(c, ours)]["median_ms"]
                         if (c, ours) in table else float("nan") for c in cases]  # fmt: skip
                speed.plot(xs, ratio, marker="o", label=f"{mode} / {ours}")
            peak = [table.get((c, mode), {}).get("peak_memory_bytes", float("nan")) / 2**20 for c in cases]
            memory.plot(xs, peak, marker="o", label=mode)
        speed.axhline(1.0, color="black", linewidth=0.8)
        speed.set_ylabel("time of mode / time of ours (above 1: ours faster)")
        memory.set_ylabel("peak memory (MiB)")
        memory.set_yscale("log")
        for ax in (speed, memory):
            ax.set_xticks(xs, labels, rotation=20, ha="right", fontsize=7)
            ax.set_xlabel(key or "case")
            ax.set_title(suite)
            ax.legend(fontsize=6)
            ax.grid(alpha=0.3)
    env = result.get("environment", {})
    fig.suptitle(f"{env.get('device')} · torch {env.get('torch')} · triton {env.get('triton')} · "
                 f"{str(env.get('commit', ''))[:12]}")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    plot_results(json.loads(pathlib.Path(sys.argv[1]).read_text()), pathlib.Path(sys.argv[2]))
