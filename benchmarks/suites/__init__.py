"""Benchmark suites, one module per op or model, each with ``cases(device, full) -> list[Case]``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Case:
    """One shape of one op, timed in several modes side by side.

    ``modes`` maps a mode name (``"plain forward"``, ``"ours"``, ``"torch.func.jvp"``, ...) to a
    zero-argument callable. ``flops``/``bytes`` give the work per mode (for TFLOP/s, GB/s), by an
    explicit formula. ``check`` returns ``{mode: max relative error against the float64 reference}`` and
    ``tolerance`` the error above which a mode counts as computing the wrong thing.
    """

    suite: str
    name: str
    params: dict
    modes: dict[str, Callable[[], object]]
    flops: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Callable[[], dict]] = field(default_factory=dict)  # more fields for a mode's row
    check: Callable[[], dict[str, float]] | None = None
    tolerance: float = 0.0
    # (numerator mode, denominator mode) pairs reported as time ratios in the table.
    ratios: tuple[tuple[str, str], ...] = ()
    # > 0: each ratio is also measured side by side over this many rounds (``interleaved_ratio``),
    # for ratios near 1 that two medians timed one after the other cannot resolve.
    interleaved_rounds: int = 0


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference over the largest magnitude of ``expected`` (float64)."""
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()
