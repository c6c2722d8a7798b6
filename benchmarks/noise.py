"""Is this run's timing trustworthy? The machine's load before and during the run, and how much
repeated timings spread, against thresholds.

On a CPU the suites run one OpenMP thread per core, so every parallel region waits for its slowest
thread: one core kept busy by another process stretches every call, and one run read the
linearized ViT at 19× the plain forward (3.0× on a quiet machine) while each row's repeats
agreed with each other. So the spread of a row alone cannot tell; the guard also looks at

- the load: the CPU time other processes use in a one-second sample before the run and during
  the run (``/proc/stat``'s busy time less this process's own; where there is no ``/proc/stat``,
  the 1-minute load average before the run, and after it less this run's threads). The load
  average alone remembers the last minute: a fresh clone's ``make bench`` read 1.65 from its own
  set-up, with nothing else running;
- a calibration: one fixed matmul timed at the start and at the end of the run. A machine that
  slowed down (or sped up) in between moves it; a busy one spreads it.

``verdict`` decides from the recorded numbers alone, so it is tested on synthetic inputs.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from .measure import time_call

MAX_OTHER_LOAD = 0.5
"""Cores' worth of other runnable work (on average) above which a CPU run is void. With one
thread per core, an extra runnable thread takes a core from a parallel region half of the time at
this level; the 19× collapse was one busy core (load 1). The quiet 2-core machine reads 0–0.4.
Applied to CPU runs only: a GPU's timings are taken by CUDA events on the device."""

MAX_CALIBRATION_DRIFT = 1.25
"""Largest ratio between the calibration matmul's median time at the start and at the end of the
run (either way). Quiet runs repeat within a few percent; 25% means the machine changed."""

MAX_CALIBRATION_SPREAD = 1.25
"""Largest p80/p20 of the calibration matmul's repeats (a fixed, compute-bound call that on a
quiet machine repeats within a few percent)."""

MAX_MEDIAN_ROW_SPREAD = 1.15
"""Largest median over the rows of p80/p20. The quiet committed CPU runs read 1.02–1.03 (no row
above 1.3); a run whose typical row spreads by 15% cannot resolve the ratios it reports."""

CALIBRATION_SIZE = {"cpu": 1024, "cuda": 8192}  # square matmul: fp32 on the CPU, bf16 on a GPU


def calibrate(device: torch.device) -> dict:
    """The fixed matmul's time (median, p20, p80 in ms) and its rate in TFLOP/s (from the median)."""
    n = CALIBRATION_SIZE[device.type]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    timing = time_call(lambda: a @ b, device, min_seconds=0.2, min_repeats=10)
    return {
        "matmul": f"{n}x{n}x{n} {str(dtype).removeprefix('torch.')}",
        **{k: timing[k] for k in ("median_ms", "p20_ms", "p80_ms", "repeats")},
        "tflops_per_s": 2 * n**3 / (timing["median_ms"] / 1e3) / 1e12,
    }


def _busy_seconds() -> float | None:
    """Seconds of CPU time all processes have used since boot (``/proc/stat``), or ``None``."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def _other_load_since(busy: float, own: float, start: float) -> float:
    """Cores' worth of CPU time other processes used since ``busy``, ``own`` and ``start`` were read."""
    return max(0.0, (_busy_seconds() - busy) - (_own_seconds() - own)) / (time.monotonic() - start)


def other_load(seconds: float = 1.0) -> float | None:
    """Cores' worth of CPU time other processes use over the next ``seconds`` (``None`` without
    ``/proc/stat``)."""
    busy, own, start = _busy_seconds(), _own_seconds(), time.monotonic()
    if busy is None:
        return None
    time.sleep(seconds)
    return _other_load_since(busy, own, start)


class Probe:
    """Started before the suites and finished after them: ``finish(rows)`` gives the ``noise``
    section of results.json (the measurements, the thresholds and the verdict)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.load_before = list(os.getloadavg())
        self.other_before = other_load()
        self.wall, self.busy, self.own = time.monotonic(), _busy_seconds(), _own_seconds()
        self.calibration_start = calibrate(device)

    def finish(self, rows: list[dict]) -> dict:
        calibration_end = calibrate(self.device)
        wall = time.monotonic() - self.wall
        load_after = list(os.getloadavg())
        if self.busy is not None:
            other = _other_load_since(self.busy, self.own, self.wall)
            how = "/proc/stat busy time less this process's CPU time, over the run's wall time"
        else:
            other = max(0.0, load_after[0] - torch.get_num_threads())
            how = "1-minute load average after the run less this run's threads"
        noise = {
            "device_type": self.device.type,
            "cpu_cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "load_average_before": self.load_before,
            "other_load_before": self.other_before,
            "load_average_after": load_after,
            "other_load_during": other,
            "other_load_how": how,
            "wall_seconds": wall,
            "calibration_start": self.calibration_start,
            "calibration_end": calibration_end,
            "median_row_spread": median_row_spread(rows),
            "thresholds": {"max_other_load": MAX_OTHER_LOAD, "max_calibration_drift": MAX_CALIBRATION_DRIFT,
                           "max_calibration_spread": MAX_CALIBRATION_SPREAD,
                           "max_median_row_spread": MAX_MEDIAN_ROW_SPREAD},  # fmt: skip
        }
        noise["reasons"] = verdict(noise)
        noise["trustworthy"] = not noise["reasons"]
        return noise


def median_row_spread(rows: list[dict]) -> float | None:
    """The median over timed rows of p80/p20 (``None`` when no row was timed)."""
    spreads = [r["p80_ms"] / r["p20_ms"] for r in rows if r.get("p20_ms")]
    return statistics.median(spreads) if spreads else None


def load_before(sampled: float | None, load_average: float) -> tuple[float, str]:
    """The other load before the run and what measured it: the one-second ``/proc/stat`` sample,
    else (``None``) the 1-minute load average."""
    if sampled is not None:
        return sampled, "other processes' cores busy in a 1 s sample"
    return load_average, "1-minute load average"


def verdict(noise: dict) -> list[str]:
    """Why this run's timings cannot be trusted: one reason per threshold crossed (none: trusted)."""
    reasons = []
    if noise.get("device_type") == "cpu":
        before, what = load_before(noise.get("other_load_before"), noise["load_average_before"][0])
        if before > MAX_OTHER_LOAD:
            reasons.append(f"the machine was busy before the run ({what} {before:.2f}, threshold {MAX_OTHER_LOAD})")
        if noise["other_load_during"] > MAX_OTHER_LOAD:
            reasons.append(f"other processes kept {noise['other_load_during']:.2f} cores busy during the run "
                           f"(threshold {MAX_OTHER_LOAD})")  # fmt: skip
    start, end = noise["calibration_start"], noise["calibration_end"]
    drift = max(end["median_ms"] / start["median_ms"], start["median_ms"] / end["median_ms"])
    if drift > MAX_CALIBRATION_DRIFT:
        reasons.append(f"the calibration matmul took {start['median_ms']:.2f} ms at the start and "
                       f"{end['median_ms']:.2f} ms at the end ({drift:.2f}x, threshold {MAX_CALIBRATION_DRIFT})")  # fmt: skip
    for when, calibration in (("start", start), ("end", end)):
        spread = calibration["p80_ms"] / calibration["p20_ms"]
        if spread > MAX_CALIBRATION_SPREAD:
            reasons.append(f"the calibration matmul's repeats spread {spread:.2f}x (p80/p20) at the {when} "
                           f"(threshold {MAX_CALIBRATION_SPREAD})")  # fmt: skip
    spread = noise.get("median_row_spread")
    if spread is not None and spread > MAX_MEDIAN_ROW_SPREAD:
        reasons.append(f"the median row's repeats spread {spread:.2f}x (p80/p20; threshold {MAX_MEDIAN_ROW_SPREAD})")
    return reasons
