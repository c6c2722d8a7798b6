"""A Markdown table of a run's stored results (for the README), with its machine and commit.

    python -m benchmarks.report benchmarks/results/<run>/results.json
"""

from __future__ import annotations

import json
import pathlib
import sys


def markdown_table(result: dict) -> str:
    """One row per (case, mode): median time, TFLOP/s, peak and saved memory, error, ratios."""
    env = result["environment"]
    lines = [
        f"{env['device']}, {env['cpu_threads']} threads, torch {env['torch']}, triton {env['triton']}, "
        f"commit {str(env['commit'])[:12]}, {env['time_utc']}",
        "",
        "| suite | case | mode | median ms | TFLOP/s | peak MiB | saved MiB | max rel. error | ratios |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        mode = f"{r['mode']} [{r['backend']}]" if r["mode"].startswith(("ours", "TAFT")) and r.get("backend") else r["mode"]
        if "error" in r:
            lines.append(f"| {r['suite']} | {r['case']} | {mode} | failed: {r['error'][:80]} | | | | | |")
            continue
        ratios = ", ".join(f"{k.removeprefix('time ')} = {v:.2f}×" for k, v in r.get("ratios", {}).items())
        cells = [
            f"{r['median_ms']:.3f}",
            f"{r['tflops_per_s']:.2f}" if "tflops_per_s" in r else "",
            f"{r['peak_memory_bytes'] / 2**20:.1f}",
            f"{r['saved_bytes'] / 2**20:.1f}" if "saved_bytes" in r else "",
            f"{r['max_relative_error']:.1e}" if "max_relative_error" in r else "",
        ]
        lines.append(f"| {r['suite']} | {r['case']} | {mode} | " + " | ".join(cells) + f" | {ratios} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table(json.loads(pathlib.Path(sys.argv[1]).read_text())))
