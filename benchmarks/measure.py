"""Time, peak memory and the environment of a benchmark run.

Time is the median with p20/p80 over repeated calls: ``triton.testing.do_bench`` on a GPU, a
wall-clock loop on the CPU; a ratio of two calls' times can be measured side by side, round by
round (``interleaved_ratio``). Peak memory is what a call allocates above what existed before it:
the CUDA allocator's peak on a GPU, the profiler's allocation record on the CPU.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time

import torch

QUANTILES = (0.5, 0.2, 0.8)


def time_call(fn, device: torch.device, min_seconds: float = 0.5, min_repeats: int = 5, max_repeats: int = 200,
              warmups: int = 2) -> dict:  # fmt: skip
    """``{"median_ms", "p20_ms", "p80_ms", "repeats"}`` for calling ``fn()``.

    On the CPU, ``warmups`` warm-up calls first (lazy imports, and the allocator's first large
    blocks: glibc raises its mmap threshold only after freeing one), then at least ``min_repeats``
    calls and more until ``min_seconds`` have passed (at most ``max_repeats``).
    """
    if device.type == "cuda":
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(fn, quantiles=list(QUANTILES))
        return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "repeats": None}
    for _ in range(warmups):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_repeats or (time.perf_counter() - start < min_seconds and len(times) < max_repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    median, p20, p80 = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64))
    return {"median_ms": median.item(), "p20_ms": p20.item(), "p80_ms": p80.item(), "repeats": len(times)}


def interleaved_ratio(numerator, denominator, device: torch.device, rounds: int) -> dict:
    """``numerator()``'s time over ``denominator()``'s, measured side by side: each round calls both
    once (in alternating order) and gives one ratio. A drift in the machine's speed (another
    process, the clock) slows both calls of a round alike, so it cancels in the ratio, where it
    would not between two medians timed one after the other. ``{"median", "p20", "p80", "rounds"}``
    of the rounds' ratios."""

    def seconds(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    ratios = []
    for round_ in range(rounds):
        if round_ % 2 == 0:
            top = seconds(numerator)
            bottom = seconds(denominator)
        else:
            bottom = seconds(denominator)
            top = seconds(numerator)
        ratios.append(top / bottom)
    median, p20, p80 = torch.tensor(ratios, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64))
    return {"median": median.item(), "p20": p20.item(), "p80": p80.item(), "rounds": rounds}


def peak_memory(fn, device: torch.device) -> int:
    """Bytes allocated by ``fn()`` at its peak, above what was allocated before the call. On a GPU
    after one unmeasured call: a first call compiles and autotunes (Triton's benchmarking allocates
    a 256 MiB cache-flush buffer), which a steady-state step does not."""
    if device.type == "cuda":
        fn()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        del result
        return torch.cuda.max_memory_allocated(device) - before
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == DeviceType.CPU),
        key=lambda e: e.start_ns(),
    )
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


COPY_BYTES = {"cpu": 64 * 2**20, "cuda": 2**30}  # one tensor's size: far beyond the CPU's caches, a GPU's L2


def copy_bandwidth(device: torch.device) -> dict:
    """The machine's copy rate: a large float32 tensor copied into another, counting the bytes read
    and written (the yardstick for memory-bound kernels such as layer norm)."""
    elements = COPY_BYTES[device.type] // 4
    source, target = torch.randn(elements, device=device), torch.empty(elements, device=device)
    timing = time_call(lambda: target.copy_(source), device, min_seconds=0.2, min_repeats=10)
    return {"copy_bytes": 2 * COPY_BYTES[device.type], "copy_ms": timing["median_ms"],
            "copy_gb_per_s": 2 * COPY_BYTES[device.type] / (timing["median_ms"] / 1e3) / 1e9}  # fmt: skip


def environment(device: torch.device) -> dict:
    """The machine, versions and commit that a result row belongs to."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "commit": _git_commit(),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }


def _git_commit() -> str | None:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()  # fmt: skip
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None
