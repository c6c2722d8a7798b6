"""The main job: benchmark and verify every suite, print the ratios, store JSON and a report.

    python -m benchmarks.run                  # small default suite on this machine's device
    python -m benchmarks.run --full           # the full suite (the default on a GPU)
    python -m benchmarks.run --suite attention layer_norm --out benchmarks/results/my-run
    python -m benchmarks.run --strict         # exit 2 when the machine was too busy to trust the timings
    python -m benchmarks.run --budget-s 300   # start no case after 300 s (benchmarks/gpu.sh's time limit)

Each row holds the time (median, p20, p80), FLOP/s or bytes/s where the case defines them, peak
memory, and the error against the float64 reference, with the device, versions and commit of
the run, so every ratio in the table can be recomputed from the JSON. The environment adds the
machine's measured matmul rate and copy bandwidth (the yardsticks of the figures), and the
``noise`` section the load and timing spread that decide whether the run can be trusted
(benchmarks/noise.py). Beside results.json: table.md, report.md and its figures.

Exit status: 1 when one of our results is wrong, 2 under ``--strict`` when the timings are not
trustworthy, else 0.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import pathlib
import sys
import time

import torch
from tqdm import tqdm

from .measure import copy_bandwidth, environment, interleaved_ratio, peak_memory, time_call
from .noise import MAX_OTHER_LOAD, Probe, load_before
from .report import markdown_table, noise_warning, write_report

SUITES = ("attention", "layer_norm", "mlp", "vit", "patched", "taft_data")
RESULTS = pathlib.Path(__file__).parent / "results"


def run_case(case, device: torch.device) -> list[dict]:
    """Time and check every mode of ``case``: one row per mode."""
    try:
        errors = case.check() if case.check else {}
    except Exception as error:  # a check that cannot run is a result too: every mode's row says so
        errors, check_error = {}, f"check failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}"
    else:
        check_error = None
    rows = []
    for mode, fn in case.modes.items():
        row = {"suite": case.suite, "case": case.name, "mode": mode, **case.params}
        if check_error:
            row["check_error"] = check_error
        try:
            row["peak_memory_bytes"] = peak_memory(fn, device)  # (also a warm-up: compile, autotune)
            row.update(time_call(fn, device, warmups=1))
            if mode in case.extras:
                row.update(case.extras[mode]())
        except Exception as error:  # a mode that cannot run (e.g. jvp through fused SDPA) is a result
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            rows.append(row)
            continue
        seconds = row["median_ms"] / 1e3
        if "batch" in case.params:
            row["images_per_s"] = case.params["batch"] / seconds
        if mode in case.flops:
            row["flops"] = case.flops[mode]
            row["tflops_per_s"] = case.flops[mode] / seconds / 1e12
        if mode in case.bytes:
            row["bytes"] = case.bytes[mode]
            row["gb_per_s"] = case.bytes[mode] / seconds / 1e9
        if mode in errors:
            row["max_relative_error"] = errors[mode]
            row["correct"] = bool(errors[mode] <= case.tolerance)
        rows.append(row)
    by_mode = {r["mode"]: r for r in rows}
    for numerator, denominator in case.ratios:
        a, b = by_mode.get(numerator, {}), by_mode.get(denominator, {})
        if "median_ms" in a and "median_ms" in b:
            key = f"time {numerator} / {denominator}"
            b.setdefault("ratios", {})[key] = a["median_ms"] / b["median_ms"]
            if case.interleaved_rounds:
                side_by_side = interleaved_ratio(case.modes[numerator], case.modes[denominator], device,
                                                 case.interleaved_rounds)  # fmt: skip
                b["ratios"][key] = side_by_side["median"]
                b.setdefault("interleaved_ratios", {})[key] = side_by_side
    return rows


def run_cases(cases, device: torch.device, budget_s: float | None = None) -> tuple[list[dict], list[str]]:
    """The rows of every case run in order, and the names (``suite/case``) of those not started
    because ``budget_s`` seconds had passed (a case already started runs to its end)."""
    start, rows, not_run = time.monotonic(), [], []
    for case in tqdm(cases, desc="benchmarks", unit="case", file=sys.stderr):
        if budget_s is not None and time.monotonic() - start >= budget_s:
            not_run.append(f"{case.suite}/{case.name}")
            continue
        rows.extend(run_case(case, device))
    return rows, not_run


def format_table(rows: list[dict]) -> str:
    """A plain-text table: one line per (case, mode), ratios at the end of the line."""
    header = f"{'suite':<11} {'case':<40} {'mode':<46} {'median ms':>10} {'TFLOP/s':>8} {'GB/s':>7} {'peak MiB':>9} {'saved MiB':>9} {'error':>9}  ratios"
    lines = [header, "-" * len(header)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['suite']:<11} {r['case']:<40} {_mode_label(r):<46} failed: {r['error']}")
            continue
        flag = "" if r.get("correct", True) else "  WRONG RESULT"
        ratios = "  ".join(f"{k.removeprefix('time ')}={v:.2f}x" for k, v in r.get("ratios", {}).items())
        lines.append(
            f"{r['suite']:<11} {r['case']:<40} {_mode_label(r):<46} {r['median_ms']:>10.3f} "
            f"{_fmt(r.get('tflops_per_s'), 8, 2)} {_fmt(r.get('gb_per_s'), 7, 1)} "
            f"{r['peak_memory_bytes'] / 2**20:>9.1f} {_fmt(_mib(r.get('saved_bytes')), 9, 1)} "
            f"{_fmt(r.get('max_relative_error'), 9, None)}  {ratios}{flag}"
        )
    return "\n".join(lines)


def _mode_label(row: dict) -> str:
    """The mode, with the backend that ran for our own modes (e.g. ``ours [cpp]``)."""
    ours = row["mode"].startswith(("ours", "TAFT"))
    return f"{row['mode']} [{row['backend']}]" if ours and row.get("backend") else row["mode"]


def _mib(value):
    return None if value is None else value / 2**20


def _fmt(value, width, digits):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return " " * (width - 1) + "-"
    return f"{value:>{width}.{digits}f}" if digits is not None else f"{value:>{width}.1e}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", nargs="+", choices=SUITES, default=list(SUITES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full", action="store_true", help="the full suite (default on a GPU)")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="folder for results.json and the report")
    parser.add_argument("--strict", action="store_true", help="exit 2 when the timings are not trustworthy")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no case after this many seconds; the cases left are listed as not run")  # fmt: skip
    args = parser.parse_args(argv)
    if args.budget_s is not None and args.budget_s <= 0:
        parser.error(f"--budget-s: expected a positive number of seconds, got {args.budget_s}")
    device = torch.device(args.device)
    full = args.full or device.type == "cuda"
    out = args.out or RESULTS / f"latest-{device.type}"

    probe = Probe(device)  # the load before the run and the first calibration
    before, what = load_before(probe.other_before, probe.load_before[0])
    if device.type == "cpu" and before > MAX_OTHER_LOAD:
        print(f"note: the machine is already busy ({what} {before:.2f}); "
              "this run's timings will likely not be trustworthy", file=sys.stderr)  # fmt: skip
    yardsticks = {"matmul": probe.calibration_start["matmul"],
                  "matmul_tflops_per_s": probe.calibration_start["tflops_per_s"], **copy_bandwidth(device)}  # fmt: skip
    cases = [case for suite in args.suite for case in importlib.import_module(f"benchmarks.suites.{suite}").cases(device, full)]
    rows, not_run = run_cases(cases, device, args.budget_s)
    noise = probe.finish(rows)
    out.mkdir(parents=True, exist_ok=True)
    result = {"environment": {**environment(device), **yardsticks}, "full": full, "noise": noise, "rows": rows}
    if not_run:
        result["not_run"] = {"budget_s": args.budget_s, "cases": not_run}
        print(f"note: {len(not_run)} case(s) not run within the budget of {args.budget_s:.0f} s: "
              + ", ".join(not_run), file=sys.stderr)  # fmt: skip
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "table.md").write_text(markdown_table(result) + "\n")
    written = write_report(result, out)
    print(format_table(rows))
    print(f"\nwrote {out}/: results.json, table.md, " + ", ".join(written) + f" ({noise['wall_seconds']:.0f} s)")
    wrong = [r for r in rows if r.get("correct") is False and r["mode"] == "ours"]
    if wrong:
        print(f"{len(wrong)} case(s) where our result is WRONG", file=sys.stderr)
    warning = noise_warning(result)
    if warning:
        print(f"\nWARNING: {warning}", file=sys.stderr)
    return exit_status(result, args.strict)


def exit_status(result: dict, strict: bool) -> int:
    """1 when one of our results is wrong; 2 when ``strict`` and the timings are not trustworthy; else 0."""
    if any(r.get("correct") is False and r["mode"] == "ours" for r in result["rows"]):
        return 1
    return 2 if strict and not result.get("noise", {}).get("trustworthy", True) else 0


if __name__ == "__main__":
    sys.exit(main())
