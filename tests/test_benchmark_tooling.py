"""The main job's tooling on a synthetic case: rows, ratios, the table, the report, a figure, and
the record of measured linear paths. (Timings themselves are never asserted.)"""

import json

import pytest
import torch

from benchmarks import measure
from benchmarks.linear_paths import update
from benchmarks.figures import write_figures
from benchmarks.ptxas_census import summary
from benchmarks.report import markdown_table
from benchmarks.report import report_markdown
from benchmarks.run import format_table, run_case, run_cases
from benchmarks.suites import Case

import tangent_kernels.triton as triton_package


def synthetic_case():
    x = torch.randn(64, 64)
    return Case(
        suite="attention", name="synthetic", params={"n": 64, "backend": "reference"},
        modes={"ours": lambda: x @ x, "torch.func.jvp (math SDPA)": lambda: (x @ x) @ x},
        flops={"ours": 2 * 64**3}, check=lambda: {"ours": 0.5}, tolerance=1e-3,
        ratios=(("torch.func.jvp (math SDPA)", "ours"),),
    )  # fmt: skip


def test_rows_table_report_and_figure(tmp_path):
    rows = run_case(synthetic_case(), torch.device("cpu"))
    ours = next(r for r in rows if r["mode"] == "ours")
    assert ours["correct"] is False, "an error above tolerance must be reported as wrong"
    assert {"median_ms", "p20_ms", "p80_ms", "peak_memory_bytes", "tflops_per_s"} <= ours.keys()
    assert "time torch.func.jvp (math SDPA) / ours" in ours["ratios"]
    assert "WRONG RESULT" in format_table(rows)
    result = {"environment": {"device": "cpu", "cpu_threads": 2, "torch": "x", "triton": "y", "commit": "abc",
                              "time_utc": "now"}, "rows": rows}  # fmt: skip
    assert "| attention | synthetic | ours [reference] |" in markdown_table(result)
    assert write_figures(json.loads(json.dumps(result)), tmp_path) == ["attention_time_memory.png"]
    assert (tmp_path / "attention_time_memory.png").stat().st_size > 0


def test_interleaved_ratio_alternates_and_cancels_drift(monkeypatch):
    """On a fake clock that each call advances (the numerator by 2 units, the denominator by 1, and
    every call slower than the last, as a machine drifting): each round's ratio is 2 within the
    drift, where the ratio of two medians timed one after the other would not be; the order
    alternates round by round. Nothing real is timed."""
    clock, calls = [0.0], []

    def work(name, units):
        def fn():
            calls.append(name)
            clock[0] += units * (1 + 0.01 * len(calls))

        return fn

    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock[0])
    ratio = measure.interleaved_ratio(work("a", 2), work("b", 1), torch.device("cpu"), rounds=6)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert ratio["rounds"] == 6 and 1.95 < ratio["p20"] <= ratio["median"] <= ratio["p80"] < 2.05


def test_interleaved_rounds_set_the_ratio(monkeypatch):
    case = synthetic_case()
    case.interleaved_rounds = 3
    monkeypatch.setattr("benchmarks.run.interleaved_ratio",
                        lambda a, b, device, rounds: {"median": 1.5, "p20": 1.4, "p80": 1.6, "rounds": rounds})  # fmt: skip
    ours = next(r for r in run_case(case, torch.device("cpu")) if r["mode"] == "ours")
    key = "time torch.func.jvp (math SDPA) / ours"
    assert ours["ratios"][key] == 1.5 and ours["interleaved_ratios"][key]["rounds"] == 3


def test_budget_stops_starting_cases(monkeypatch):
    """On a fake clock where each case takes 10 s, a 15 s budget runs two cases (the second starts
    at 10 s) and lists the third as not run; the report says which."""
    clock = [0.0]

    def fake_run_case(case, device):
        clock[0] += 10.0
        return [{"suite": case.suite, "case": case.name, "mode": "ours", "median_ms": 1.0}]

    monkeypatch.setattr("benchmarks.run.time.monotonic", lambda: clock[0])
    monkeypatch.setattr("benchmarks.run.run_case", fake_run_case)
    cases = [synthetic_case() for _ in range(3)]
    for i, case in enumerate(cases):
        case.name = f"case{i}"
    rows, not_run = run_cases(cases, torch.device("cpu"), budget_s=15)
    assert [r["case"] for r in rows] == ["case0", "case1"] and not_run == ["attention/case2"]
    assert run_cases(cases, torch.device("cpu"))[1] == []
    result = {"environment": {"device": "cpu"}, "rows": [], "not_run": {"budget_s": 15, "cases": not_run}}
    assert "Not run within the time budget of 15 s: `attention/case2`." in report_markdown(result, [])


def test_linear_paths_follow_the_measurement():
    def result(fused_ms):
        rows = [{"suite": "mlp", "case": "c", "mode": "ours fused GEMM", "median_ms": fused_ms, "features": 8, "hidden": 32},
                {"suite": "mlp", "case": "c", "mode": "ours composite", "median_ms": 2.0, "features": 8, "hidden": 32}]  # fmt: skip
        return {"environment": {"device": "GPU X"}, "rows": rows}

    table = update(result(1.0), {})
    assert table == {"GPU X": [[8, 32], [32, 8]]}
    assert update(result(3.0), table) == {"GPU X": []}


def test_ptxas_census_summary():
    def row(kernel, config, target, spill, shared=1000, instructions=None):
        return {"kernel": kernel, "config": config, "target": target, "specialization": "aligned", "registers": 255,
                "spill_bytes": spill, "shared_bytes": shared, "fits": True, "mma": "wgmma",
                "sass_instructions_per_tile": instructions, "sass_instructions_per_steady_tile": instructions}  # fmt: skip

    rows = [
        row("attention fwd", "fp32-ieee D=64 M=64 N=16 w=8 s=2", "sm_90", 16),
        row("attention fwd", "fp32-ieee D=64 M=32 N=16 w=4 s=2", "sm_90", 0, shared=120000),
        row("ptxas_census reference", "fp16 D=64 M=128 N=64 w=8 s=3", "sm_90", 0, instructions=330),
        row("ptxas_census fwd+tangent", "fp16 D=64 M=128 N=64 w=8 s=3", "sm_90", 0, instructions=660),
    ]
    tutorial = [{"target": "sm_90", "D": 64, "loop_instructions": 300}]
    text = summary(rows, "versions", 60.0, "python -m benchmarks.ptxas_census", tutorial)
    assert "| attention fwd | fp32-ieee | sm_90 | aligned | 2 | 0 | 1 | 16 | 255 |" in text
    assert "- attention fwd fp32-ieee D=64 M=64 N=16 w=8 s=2 on sm_90 (aligned)" in text  # the first config spills
    assert "| sm_90 | D=64 | aligned | 300 | 330 | – | 660 | – | 2.20 | – | 2.00 |" in text


@pytest.mark.parametrize("head_dim, keys", [(64, 197), (80, 32), (16, 7)])  # a partial last key tile, none, one only
def test_flash_reference_matches_sdpa(device, head_dim, keys):
    """The census's yardstick forward computes attention (under the interpreter on a CPU)."""
    if not triton_package.AVAILABLE:
        pytest.skip(triton_package.UNAVAILABLE_REASON)
    from benchmarks.flash_reference import flash_forward

    q = torch.randn(2, 3, 33, head_dim, device=device)
    k, v = torch.randn(2, 2, 3, keys, head_dim, device=device).unbind(0)
    expected = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    torch.testing.assert_close(flash_forward(q, k, v, block_m=16, block_n=16).double(), expected, atol=1e-5, rtol=1e-5)


def test_first_config_candidates_and_specs():
    """The search tries the list's own configs first, then smaller-or-equal tiles largest first; a
    candidate's spec is the named list's, and the kernel module's table is left as shipped."""
    from benchmarks.pick_first_configs import candidates, spec
    from tangent_kernels.triton import attention

    shipped = [(64, 32, 8, 2), (128, 64, 8, 3)]
    tried = candidates(shipped)
    assert tried[:2] == shipped and (64, 32, 4, 3) in tried and (128, 32, 8, 3) not in tried
    areas = [m * n for m, n, _, _ in tried[2:]]
    assert areas == sorted(areas, reverse=True) and max(areas) <= 64 * 32
    before = [list(v) for v in attention._DQ_CONFIGS["16-bit"].values()]
    name, kernel, args, warps, stages = spec("attention", "dq", "16-bit", 64, (16, 16, 4, 1), "bf16", 197)
    assert name == "dq bf16 D=64 M=16 N=16 w=4 s=1" and (warps, stages) == (4, 1) and args["BLOCK_M"] == 16
    assert [list(v) for v in attention._DQ_CONFIGS["16-bit"].values()] == before


@pytest.mark.skipif(not triton_package.AVAILABLE, reason=triton_package.UNAVAILABLE_REASON)
def test_pick_first_configs_keeps_a_clean_first_config():
    """Compiled for real (sm_80/86/89/90, both launches): a list whose first config the compile
    record shows spill-free everywhere is kept as it is."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "benchmarks.pick_first_configs", "--workers", "2",
                          "attention:dq:ieee:16"], capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.splitlines()[-1] == "attention:dq:ieee:16 -> (32, 64, 4, 2)", run.stdout
