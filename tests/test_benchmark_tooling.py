"""The main job's tooling on a synthetic case: rows, ratios, the table, the report, the plot, and
the record of measured linear paths. (Timings themselves are never asserted.)"""

import json

import torch

from benchmarks.linear_paths import update
from benchmarks.plot import plot_results
from benchmarks.ptxas_census import summary
from benchmarks.report import markdown_table
from benchmarks.run import format_table, run_case
from benchmarks.suites import Case


def synthetic_case():
    x = torch.randn(64, 64)
    return Case(
        suite="attention", name="synthetic", params={"n": 64, "backend": "reference"},
        modes={"ours": lambda: x @ x, "torch.func.jvp (math SDPA)": lambda: (x @ x) @ x},
        flops={"ours": 2 * 64**3}, check=lambda: {"ours": 0.5}, tolerance=1e-3,
        ratios=(("torch.func.jvp (math SDPA)", "ours"),),
    )  # fmt: skip


def test_rows_table_report_and_plot(tmp_path):
    rows = run_case(synthetic_case(), torch.device("cpu"))
    ours = next(r for r in rows if r["mode"] == "ours")
    assert ours["correct"] is False, "an error above tolerance must be reported as wrong"
    assert {"median_ms", "p20_ms", "p80_ms", "peak_memory_bytes", "tflops_per_s"} <= ours.keys()
    assert "time torch.func.jvp (math SDPA) / ours" in ours["ratios"]
    assert "WRONG RESULT" in format_table(rows)
    result = {"environment": {"device": "cpu", "cpu_threads": 2, "torch": "x", "triton": "y", "commit": "abc",
                              "time_utc": "now"}, "rows": rows}  # fmt: skip
    assert "| attention | synthetic | ours [reference] |" in markdown_table(result)
    plot_results(json.loads(json.dumps(result)), tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_linear_paths_follow_the_measurement():
    def result(fused_ms):
        rows = [{"suite": "mlp", "case": "c", "mode": "ours fused GEMM", "median_ms": fused_ms, "features": 8, "hidden": 32},
                {"suite": "mlp", "case": "c", "mode": "ours composite", "median_ms": 2.0, "features": 8, "hidden": 32}]  # fmt: skip
        return {"environment": {"device": "GPU X"}, "rows": rows}

    table = update(result(1.0), {})
    assert table == {"GPU X": [[8, 32], [32, 8]]}
    assert update(result(3.0), table) == {"GPU X": []}


def test_ptxas_census_summary():
    rows = [
        {"module": "tangent_kernels.triton.attention", "spec": "fwd fp32-ieee D=64 M=64 N=16 w=8 s=2",
         "target": "sm_90", "registers": 255, "spill_bytes": 16},
        {"module": "tangent_kernels.triton.attention", "spec": "fwd fp32-ieee D=64 M=32 N=16 w=4 s=2",
         "target": "sm_90", "registers": 32, "spill_bytes": 20000},
    ]
    text = summary(rows, "versions")
    assert "| attention | fwd | fp32-ieee | sm_90 | 2 | 20000 |" in text
    assert "- sm_90 fwd fp32-ieee D=64 M=32 N=16 w=4 s=2: 32 registers, 20000 bytes" in text
